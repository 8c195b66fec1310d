"""A paper's claim as a check on measured quantities, judged over seeds.

    ours OP reference * times  (+ margin the claim must win by, - tolerance it may miss by)

`reference` is a number (`value`) or another quantity of the same runs (`than`, paired seed by seed).
Over seeds a claim is judged on the means (`over = "mean"`) or on every seed (`over = "every"`). A
claim with a quantity some run could not give (None) does not hold. Only the runner computes `holds`.
"""

import dataclasses
import math
import operator

import numpy as np

from nanomarkov.errors import NanoMarkovError
from nanomarkov.reproduce.quantities import check_quantity

OPERATORS = {"<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge}
OVER = ("mean", "every")
CLAIM_KEYS = (
    "id",
    "claim",
    "source",
    "paper",
    "experiment",
    "quantity",
    "op",
    "value",
    "than",
    "times",
    "margin",
    "tolerance",
    "over",
    "if_not",
)
REQUIRED = ("id", "claim", "source", "paper", "quantity", "op")


@dataclasses.dataclass(frozen=True)
class Claim:
    id: str
    claim: str  # the claim in words
    source: str  # where in the paper: figure or section
    paper: str  # what the paper reports
    quantity: str
    op: str
    experiment: str | None = None  # the experiment whose runs measure it (None: the paper's first)
    value: float | None = None
    than: str | None = None
    times: float = 1.0
    margin: float = 0.0
    tolerance: float = 0.0
    over: str = "mean"
    if_not: str = ""  # written before the run: what would be needed were it not to hold

    def quantities(self):
        return [self.quantity] + ([self.than] if self.than else [])

    def rule(self) -> str:
        """The check in words, e.g. 'mean of final_excess <= 0.01 + 0.002 (tolerance)'."""
        reference = self.than if self.than else f"{self.value:g}"
        if self.times != 1.0:
            reference = f"{self.times:g} x {reference}"
        sign = 1 if self.op in ("<", "<=") else -1
        extra = [f"{'-+'[sign > 0]} {self.tolerance:g} (tolerance)"] if self.tolerance else []
        extra += [f"{'+-'[sign > 0]} {self.margin:g} (margin)"] if self.margin else []
        subject = f"{'mean of' if self.over == 'mean' else 'every seed:'} {self.quantity}"
        return " ".join([subject, self.op, reference, *extra])


def _number(entry, key, default=None):
    value = entry.get(key, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise NanoMarkovError(f"{key} must be a finite number, got {value!r}")
    return float(value)


def read_claim(entry, experiments) -> Claim:
    """A [[claims]] entry, checked: its keys, its quantities (the closed set), op, over and the numbers."""
    if not isinstance(entry, dict):
        raise NanoMarkovError(f"must be a table, got {entry!r}")
    unknown = [key for key in entry if key not in CLAIM_KEYS]
    if unknown:
        raise NanoMarkovError(f"unknown key {unknown[0]!r}; valid keys: {', '.join(CLAIM_KEYS)}")
    missing = [key for key in REQUIRED if not isinstance(entry.get(key), str) or not entry[key]]
    if missing:
        raise NanoMarkovError(f"lacks {', '.join(missing)} (each a non-empty string)")
    if ("value" in entry) == ("than" in entry):
        raise NanoMarkovError("give exactly one of value = NUMBER or than = 'QUANTITY' to compare with")
    if entry["op"] not in OPERATORS:
        raise NanoMarkovError(f"op must be one of {', '.join(OPERATORS)}, got {entry['op']!r}")
    if entry.get("over", "mean") not in OVER:
        raise NanoMarkovError(f"over must be mean or every, got {entry['over']!r}")
    if entry.get("experiment") is not None and entry["experiment"] not in experiments:
        raise NanoMarkovError(f"experiment {entry['experiment']!r} is not one of {', '.join(experiments)}")
    numbers = {key: _number(entry, key, default) for key, default in (("times", 1.0), ("margin", 0.0))}
    numbers |= {"tolerance": _number(entry, "tolerance", 0.0), "value": _number(entry, "value")}
    if numbers["margin"] < 0 or numbers["tolerance"] < 0:
        raise NanoMarkovError(
            "margin and tolerance must be >= 0 (a margin strengthens the check, a tolerance eases it)"
        )
    for name in [entry["quantity"]] + ([entry["than"]] if "than" in entry else []):
        check_quantity(name)
    kept = {key: entry[key] for key in CLAIM_KEYS if key in entry and key not in numbers}
    return Claim(**(kept | numbers))


def passes(claim, ours, reference) -> bool:
    """One comparison of the claim's rule (ours and reference as numbers)."""
    target = reference * claim.times
    shift = claim.margin - claim.tolerance
    target = target - shift if claim.op in ("<", "<=") else target + shift
    return bool(OPERATORS[claim.op](ours, target))


def spread(values) -> str:
    """'mean ± sd (n seeds)' (sd over seeds, ddof 1; 0 for one seed)."""
    values = np.asarray(values, dtype=float)
    sd = float(values.std(ddof=1)) if values.size > 1 else 0.0
    return f"{values.mean():.4g} ± {sd:.2g} ({values.size} seed{'s' if values.size != 1 else ''})"


def judge(claim, table) -> dict:
    """The claim against `table`, one {quantity: value} per seed of its experiment's runs: claims.json's entry."""
    ours = [row.get(claim.quantity) for row in table]
    references = [claim.value] * len(table) if claim.than is None else [row.get(claim.than) for row in table]
    missing = sum(o is None or r is None for o, r in zip(ours, references))
    result = {"id": claim.id, "claim": claim.claim, "paper": claim.paper, "source": claim.source}
    result |= {"check": claim.rule(), "values": ours, "references": references}
    if not table or missing:
        got = [v for v in ours if v is not None]
        said = spread(got) + "; " if got else ""
        result["ours"] = f"{said}not measured in {missing} of {len(table)} seeds" if table else "no finished run"
        return result | {"holds": False, "if_not": claim.if_not}
    if claim.over == "mean":
        holds = passes(claim, float(np.mean(ours)), float(np.mean(references)))
    else:
        holds = all(passes(claim, o, r) for o, r in zip(ours, references))
    result["ours"] = spread(ours)
    if claim.than:
        result["against"] = f"{claim.than} {spread(references)}"
    return result | {"holds": holds, "if_not": "" if holds else claim.if_not}
