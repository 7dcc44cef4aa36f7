"""Token strata that can be measured offline, each a *proxy* for a kind of knowledge.

Zhou et al. (2025) split what a model knows into *memorization* (facts stored in the weights)
and *utilization* (using what the context provides).  Their benchmarks need the network; these
are the offline stand-ins, built from the evaluation text and its tokenizer alone:

* ``overall``: every predicted token of the protocol's evaluation windows (16 x 512 tokens of
  the tail of the text): the usual perplexity.
* ``memorization``: in those windows, the first token of a word that starts with a capital
  letter or a digit, is not the first word of a sentence, and has not occurred earlier in the
  window.  Such a token (a name, a place, a year, a quantity) cannot be copied from the context;
  predicting it takes what the weights store.  A proxy: some of these words are guessable from
  grammar alone, and facts hide in lower-case words too.
* ``utilization``: windows made of a span of the text followed by the same span again
  (induction, in-context copying); the stratum is the second copy, from its second token on
  (the first cannot be known to repeat).  Every such token is in the context already, so this
  measures how well the model retrieves and uses it, not what it knows.  A proxy too: copying
  is the simplest use of context.

No honest offline proxy for *reasoning* was found in the embedded texts (they hold no
questions with checkable answers), so there is no reasoning stratum.

Damage in a stratum is the increase of mean NLL over its tokens, quantized minus full
precision (:func:`measure_strata`, which also gives each stratum's KL divergence from the
full-precision model and its share of the same top token).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bitcliff.data import WindowSpec, sequence_prefix, token_windows

STRATA = ("overall", "memorization", "utilization")
SENTENCE_ENDS = (".", "!", "?", "\n", ":", ";", '"', "(", "=")
REPEAT_SPAN = 128  # tokens per copied span: two copies fit a 256-token window


@dataclass
class StratumWindows:
    """Token windows and which of their predicted tokens form one stratum.

    Attributes:
        name: the stratum.
        ids: int64 ``[B, T]`` windows.
        mask: bool ``[B, T - 1]``: ``mask[b, t]`` when token ``t + 1`` belongs to the stratum.
    """

    name: str
    ids: torch.Tensor
    mask: torch.Tensor

    @property
    def tokens(self) -> int:
        return int(self.mask.sum())


def check_strata(names) -> tuple[str, ...]:
    """``names`` as a tuple; raises ``ValueError`` naming an unknown stratum."""
    names = tuple(names)
    unknown = [n for n in names if n not in STRATA]
    if unknown:
        raise ValueError(f"unknown stratum {unknown[0]!r}: choose from {', '.join(STRATA)}")
    if not names:
        raise ValueError(f"no strata given: choose from {', '.join(STRATA)}")
    return names


def memorization_mask(tokenizer, ids: torch.Tensor, skip: int) -> torch.Tensor:
    """bool ``[B, T - 1]``: the memorization tokens of ``ids`` (module docstring); the first
    ``skip`` tokens of every window (the sequence prefix) are never in it."""
    mask = torch.zeros(ids.shape[0], ids.shape[1] - 1, dtype=torch.bool)
    for b, window in enumerate(ids.tolist()):
        pieces = [tokenizer.decode([t]) for t in window]
        seen: set[str] = set()
        previous = ""
        for t in range(skip, len(window)):
            piece = pieces[t]
            starts_word = piece[:1].isspace() or previous[-1:].isspace() or t == skip
            word = piece.strip()
            if starts_word and word:
                sentence_start = not previous.strip() or previous.strip()[-1] in SENTENCE_ENDS
                key = word.lower()
                if (word[0].isupper() or word[0].isdigit()) and not sentence_start and key not in seen and t > skip:
                    mask[b, t - 1] = True
                seen.add(key)
            previous = piece if piece.strip() or not previous else previous + piece
    return mask


def build_strata(tokenizer, text: str, n_windows: int = 16, seq_len: int = 512,
                 names=STRATA) -> dict[str, StratumWindows]:
    """The strata ``names`` of ``text`` (its evaluation part, as in the protocol), by name.

    Raises:
        ValueError: an unknown stratum, a text too short for the windows (the message says how
            many it gives), or a stratum with no token in this text.
    """
    names = check_strata(names)
    prefix = len(sequence_prefix(tokenizer))
    natural = token_windows(tokenizer, text, WindowSpec("eval", n_windows, seq_len))
    overall = torch.ones(natural.shape[0], natural.shape[1] - 1, dtype=torch.bool)
    overall[:, : max(prefix - 1, 0)] = False
    spans = token_windows(tokenizer, text, WindowSpec("eval", n_windows, REPEAT_SPAN + prefix))[:, prefix:]
    head = natural[:, :prefix]
    repeated = torch.cat([head, spans, spans], dim=1)
    copy = torch.zeros(repeated.shape[0], repeated.shape[1] - 1, dtype=torch.bool)
    copy[:, prefix + REPEAT_SPAN:] = True  # predicts tokens prefix + span + 1 ..: the second copy, from its second token
    builders = {
        "overall": lambda: StratumWindows("overall", natural, overall),
        "memorization": lambda: StratumWindows("memorization", natural, memorization_mask(tokenizer, natural, prefix)),
        "utilization": lambda: StratumWindows("utilization", repeated, copy),
    }
    strata = {name: builders[name]() for name in names}
    empty = [name for name, stratum in strata.items() if stratum.tokens == 0]
    if empty:
        raise ValueError(f"the text gives no {empty[0]} tokens (see bitcliff.study.strata); leave that stratum out")
    return strata


def reference_strata(reference, strata: dict[str, StratumWindows], batch_size: int = 4) -> dict:
    """The full-precision ``reference``'s predictions on each distinct set of the strata's windows
    (``divergence.ReferencePredictions``, keyed by ``id`` of the windows): strata sharing their
    windows (overall and memorization) share one forward."""
    from bitcliff.divergence import reference_predictions

    out = {}
    for stratum in strata.values():
        if id(stratum.ids) not in out:
            out[id(stratum.ids)] = reference_predictions(reference, stratum.ids, batch_size=batch_size, progress=False)
    return out


def reference_measures(strata: dict[str, StratumWindows], references: dict) -> dict:
    """:func:`measure_strata`'s report for the full-precision model itself, from the predictions
    :func:`reference_strata` already made (no forward again): its NLL, KL 0, same top 100 %."""
    out: dict[str, dict[str, float]] = {"nll": {}, "kl": {}, "same_top_pct": {}}
    for name, stratum in strata.items():
        out["nll"][name] = float(references[id(stratum.ids)].nll[stratum.mask].double().mean())
        out["kl"][name] = 0.0
        out["same_top_pct"][name] = 100.0
    return out


def measure_strata(model, strata: dict[str, StratumWindows], references: dict, batch_size: int = 4) -> dict:
    """Per stratum, by name: ``nll``, ``model``'s mean NLL over its tokens; ``kl``, the mean
    KL(P_reference ‖ P_model) over them (nats); ``same_top_pct``, the share of them whose most
    likely token is the reference's.  One forward per window, shared by strata sharing windows.

    Args:
        references: :func:`reference_strata` of the full-precision model on the same ``strata``.
    """
    from bitcliff.divergence import token_divergence_from

    measured: dict[int, object] = {}
    out: dict[str, dict[str, float]] = {"nll": {}, "kl": {}, "same_top_pct": {}}
    for name, stratum in strata.items():
        key = id(stratum.ids)
        if key not in measured:
            measured[key] = token_divergence_from(model, references[key], batch_size=batch_size, progress=False)
        tokens = measured[key]
        out["nll"][name] = float(tokens.nll[stratum.mask].double().mean())
        out["kl"][name] = float(tokens.kl[stratum.mask].double().mean())
        out["same_top_pct"][name] = 100 * float(tokens.same_top[stratum.mask].double().mean())
    return out
