"""The tuning seed: the static model's ordering of each shape class's admissible candidates, written
as the tuning cache a GPU machine starts from (one file per device, ``bench/results/tuning-seed/``).

Each entry, under the launcher's key (``qmatmul.quant_matmul``), is::

    {"order": [configuration, ...], "predicted_us": [[overlapped, serialized], ...]}

The order starts with the candidate whose serialized (pessimistic) bound is best and goes on with
those the bounds cannot rule out: whose overlapped (optimistic) bound beats the first one's
serialized bound (twins predicted alike counted once), at most :data:`SEED_ORDER_MAX` in all.
Only candidates that ``tuning.prune`` keeps for the shape are ranked, and :func:`write_seeds`
checks every one again.  On the GPU the launcher measures the order's candidates on the first
launch of a shape class and keeps the winner (``tuning.cached_choices``): the seed orders, the
measurement decides.
"""

from __future__ import annotations

import json
from pathlib import Path

from bench.devices import slug

#: Candidates measured per shape class on the GPU: each costs a compile there, and the GPU check's
#: kernel stage has minutes for every width, batch and capture of two shapes.
SEED_ORDER_MAX = 2
_DTYPES = {"fp16": "float16", "bf16": "bfloat16"}


def seed_order(options: list[tuple]) -> list[tuple]:
    """The seed's share of ``sass_model.ranked``'s ``(prediction, variant, configuration)`` list.

    A candidate predicted exactly as one already taken (the same compiled loop and the same work:
    e.g. a second stage that the compiler did not pipeline) is passed over: the model has no reason
    to measure it beside its twin, and the tuner, with no seed, measures every candidate anyway.
    """
    first = options[0][0]["serialized_s"]
    order, seen = [], set()
    for o in options:
        bounds = (o[0]["overlapped_s"], o[0]["serialized_s"])
        if bounds in seen or (order and bounds[0] >= first):
            continue
        order.append(o)
        seen.add(bounds)
    return order[:SEED_ORDER_MAX]


def cache_key(schedule: str, bits: int, group: int, dtype: str, capture: str, m: int, n: int, k: int) -> str:
    """The launcher's tuning-cache key of a plain launch (no bias, no act-order)."""
    from bitcliff.kernels.tuning import m_bucket

    return "|".join(str(v) for v in (schedule, bits, group, _DTYPES.get(dtype, dtype), capture,
                                      f"m{m_bucket(m)}", f"n{n}", f"k{k}", 0, 0))


def parse_key(key: str) -> dict:
    """``cache_key``'s fields back: schedule, bits, group, dtype, capture, m, n, k."""
    schedule, bits, group, dtype, capture, m, n, k, _, _ = key.split("|")
    return {"schedule": schedule, "bits": int(bits), "group": int(group), "dtype": dtype, "capture": capture,
            "m": int(m[1:]), "n": int(n[1:]), "k": int(k[1:])}


def rejected(entries: dict, sms: int) -> list[str]:
    """Every configuration of a seed (or a tuning cache) that ``tuning.prune`` would not run for its
    key's shape on a GPU with ``sms`` SMs, as ``key: configuration``."""
    from bitcliff.kernels.tuning import admissible

    out = []
    for key, entry in entries.items():
        if key.startswith("choice|"):
            continue  # a measured schedule choice, not a configuration
        f = parse_key(key)
        for config in entry["order"] if "order" in entry else [entry]:
            if not admissible(f["schedule"], config, f["m"], f["n"], f["k"], sms, f["group"]):
                out.append(f"{key}: {config}")
    return out


def write_seeds(result: dict, folder: Path, triton_version: str) -> list[Path]:
    """One seed file per device of a ``sass_model`` result, named as ``tuning.TuningCache`` names
    the cache of that device and Triton version.  Raises if any configuration is one the pruning
    rejects."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for dev in result["devices"]:
        entries = {}
        for r in result["rows"]:
            if r["device"] != dev["name"]:
                continue
            key = cache_key(r["schedule"], r["bits"], result["group"], r["dtype"], r["capture"], r["M"], r["N"], r["K"])
            entries[key] = {"order": [o["config"] for o in r["order"]],
                            "predicted_us": [[o["overlapped_us"], o["serialized_us"]] for o in r["order"]]}
        bad = rejected(entries, dev["sms"])
        if bad:
            raise AssertionError("the seed holds configurations the pruning rejects:\n" + "\n".join(bad))
        path = folder / f"autotune-{slug(dev['name'])}-triton{triton_version}.json"
        path.write_text(json.dumps(entries, indent=1, sort_keys=True) + "\n")
        paths.append(path)
    return paths
