"""What the commands share: argument groups, turning arguments into settings with messages that
name the flag, and checks that run before any work starts."""

from __future__ import annotations

import argparse
import copy
import os
import re
from pathlib import Path

from bitcliff.quant.config import QuantConfig

#: QuantConfig field -> the flag that sets it, so that a refused value names the flag.
FLAGS = {
    "bits": "--bits", "group_size": "--group-size", "damp_percent": "--damp", "calib_samples": "--calib-samples",
    "refit_rounds": "--refit-rounds", "method": "--method",
}


class UsageError(ValueError):
    """A command-line value that cannot work; the message names the flag."""


def positive_int(text: str) -> int:
    """argparse type of a count that must be at least 1 (argparse names the flag in its refusal)."""
    return _integer(text, 1, "a positive integer")


def window_length(text: str) -> int:
    """argparse type of a window length in tokens: at least 2, since a window predicts each token
    from those before it (argparse names the flag in its refusal)."""
    return _integer(text, 2, "an integer >= 2 (tokens per window)")


def nonnegative_int(text: str) -> int:
    """argparse type of a count that may be 0."""
    return _integer(text, 0, "an integer >= 0")


def positive_float(text: str) -> float:
    """argparse type of a finite number above 0 (seconds, for example)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number above 0, got {text!r}") from None
    if not (value > 0 and value != float("inf")):
        raise argparse.ArgumentTypeError(f"must be a finite number above 0, got {text!r}")
    return value


def _integer(text: str, least: int, what: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
    if value < least:
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
    return value


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """``--help`` shows every default and keeps the descriptions' line breaks.

    argparse's own formatter shows a default only beside a help text; this one shows it for every
    option that has one (a list as it is typed), and none for an on/off switch, whose help says
    what it turns on, nor where the default is None.
    """

    @staticmethod
    def _default_text(action: argparse.Action) -> str | None:
        default = action.default
        if (default is None or default is argparse.SUPPRESS or not action.option_strings
                or isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction))):
            return None
        shown = " ".join(map(str, default)) if isinstance(default, (list, tuple)) else str(default)
        return f"(default: {shown})".replace("%", "%%")

    def _format_action(self, action: argparse.Action) -> str:
        if not action.help and self._default_text(action):  # argparse formats no help line at all
            action = copy.copy(action)
            action.help = self._default_text(action)
        return super()._format_action(action)

    def _get_help_string(self, action: argparse.Action) -> str:
        text, default = action.help or "", self._default_text(action)
        if default is None or "%(default)" in text or text == default:
            return text
        return f"{text} {default}"


def add_text_args(p: argparse.ArgumentParser, seq_len: int | None = 512) -> None:
    p.add_argument("--text-file", default="wiki",
                   help="corpus: 'wiki' (the embedded Wikipedia sample), 'canterbury' (embedded books) or a path to a UTF-8 text "
                        "file; calibration and evaluation read disjoint parts of it (a text under 1,400,000 characters is split)")
    if seq_len is not None:
        p.add_argument("--seq-len", type=window_length, default=seq_len, help="tokens per window")


def add_device_arg(p: argparse.ArgumentParser) -> None:
    """``--device``: where the command computes (:mod:`bitcliff.device`)."""
    p.add_argument("--device", default="auto",
                   help="auto (a CUDA GPU when there is one, else the CPU), cpu, cuda or cuda:N; fp32 on the CPU, "
                        "the model's half precision (bf16 or fp16) on a GPU")


def device_from_args(args: argparse.Namespace):
    """The torch device ``--device`` names; a device this machine lacks names the flag."""
    from bitcliff.device import DeviceError, resolve_device

    try:
        return resolve_device(args.device)
    except DeviceError as exc:
        raise UsageError(f"--device: {exc}") from None


def add_quant_args(p: argparse.ArgumentParser, group_size: bool = True) -> None:
    """The settings of a quantization; the GPTQ defaults are the best measured ones (without
    ``group_size``, for a command that takes a list of group sizes under its own flag)."""
    p.add_argument("--method", choices=["rtn", "gptq"], default="rtn")
    if group_size:
        p.add_argument("--group-size", type=int, default=64, help="input channels per scale and zero; -1 for per-channel")
    p.add_argument("--sym", action="store_true", help="symmetric grid; without it, asymmetric")
    p.add_argument("--mse", action="store_true", help="search per-group clipping for minimal squared error")
    gptq = p.add_argument_group(
        "GPTQ", "The defaults are the best measured setting: true-sequential with one scale refit\n"
        "(measured against the paper's GPTQ in docs/results_gptq.md); --paper runs the original algorithm.")
    gptq.add_argument("--paper", action="store_true",
                      help="the original GPTQ: no true-sequential, no refit (other GPTQ flags still apply)")
    gptq.add_argument("--act-order", action="store_true", help="quantize columns by descending Hessian diagonal")
    gptq.add_argument("--static-groups", action="store_true", help="fit group grids before the solve")
    gptq.add_argument("--true-sequential", action=argparse.BooleanOptionalAction, default=True,
                      help="solve each sub-block on the outputs of those already quantized")
    gptq.add_argument("--refit-rounds", type=int, default=1, metavar="R",
                      help="refit scales to the codes by least squares, re-solving R-1 more times")
    gptq.add_argument("--damp", type=float, default=0.01, help="dampening as a fraction of mean diag(H)")
    gptq.add_argument("--calib-samples", type=positive_int, default=64, help="calibration windows")


def config_from_args(args: argparse.Namespace, bits: int, group_size: int, method: str | None = None,
                     flags: dict[str, str] | None = None) -> QuantConfig:
    """The :class:`QuantConfig` the arguments describe; a refused value names its flag
    (``flags`` overrides :data:`FLAGS` for a command whose flag is named otherwise, such as
    ``sweep --group-sizes``)."""
    paper = getattr(args, "paper", False)
    try:
        return QuantConfig(
            bits=bits,
            group_size=group_size,
            sym=args.sym,
            method=method or args.method,
            mse=args.mse,
            damp_percent=args.damp,
            act_order=args.act_order,
            static_groups=args.static_groups,
            true_sequential=False if paper else args.true_sequential,
            refit_rounds=0 if paper else args.refit_rounds,
            calib_samples=args.calib_samples,
        )
    except ValueError as exc:
        field = str(exc).split(" ", 1)[0]
        names = {**FLAGS, **(flags or {})}
        raise UsageError(f"{names.get(field, field)}: {exc}") from None


_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


def check_text_arg(value: str, flag: str = "--text-file") -> None:
    """Refuse, before any work, a text file that does not exist."""
    from bitcliff.assets import TEXTS

    if value.strip().lower() in TEXTS:
        return
    path = Path(value).expanduser()
    if not path.exists():
        raise UsageError(f"{flag} {value}: no such file (embedded texts: {', '.join(TEXTS)})")
    if not path.is_file():
        raise UsageError(f"{flag} {value}: not a file")


def check_model_arg(value: str, flag: str = "--model") -> None:
    """Refuse, before any work, a model path that does not exist (hub ids and embedded names pass)."""
    from bitcliff.assets import MODEL_ALIASES, MODELS

    key = value.strip().lower()
    if key in MODEL_ALIASES or key in MODELS or Path(value).expanduser().exists():
        return
    if _HUB_ID.match(value) and not value.startswith((".", "~")):
        return
    if os.sep in value or value.startswith((".", "~")):
        raise UsageError(f"{flag} {value}: the folder does not exist")
    raise UsageError(f"{flag} {value}: not an embedded model ({', '.join([*MODEL_ALIASES, *MODELS])}), "
                     "an existing folder or a hub id 'owner/name'")


def without_option(argv: list[str], flag: str) -> list[str]:
    """``argv`` without ``flag`` and its value (``--flag V`` or ``--flag=V``): the same command,
    to run again somewhere else."""
    out, skip = [], False
    for token in argv:
        if skip:
            skip = False
        elif token == flag:
            skip = True
        elif not token.startswith(flag + "="):
            out.append(token)
    return out


def check_out(out: Path, overwrite: bool, flag: str = "--out") -> None:
    """Refuse, before any work is done, an output folder that is occupied or cannot be written
    (see ``bitcliff.storage``)."""
    from bitcliff.storage import check_replaceable

    check_location(out, flag)
    check_replaceable(out, overwrite)


def check_file_out(path, overwrite: bool, flag: str) -> None:
    """Refuse, before any work, a one-file output (``--json``) that is occupied or cannot be
    written; the message names ``flag`` (see ``bitcliff.storage``)."""
    from bitcliff.storage import check_file_replaceable

    check_location(path, flag, file=True)
    try:
        check_file_replaceable(path, overwrite)
    except OSError as exc:
        raise UsageError(f"{flag} {path}: {exc}") from None


def check_location(path, flag: str, file: bool = False, renamed: bool = True) -> None:
    """Refuse, before any work, an output path (folder, or ``file``) that could never be written;
    the message names ``flag`` (``renamed``: see ``storage.check_writable_location``)."""
    from bitcliff.storage import check_writable_location

    try:
        check_writable_location(path, file=file, renamed=renamed)
    except OSError as exc:
        raise UsageError(f"{flag} {path}: {exc}") from None
