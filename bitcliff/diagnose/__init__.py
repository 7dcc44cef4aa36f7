"""Diagnosis: capture sessions, signal tracing, component assessment, patching, verdict, report."""
