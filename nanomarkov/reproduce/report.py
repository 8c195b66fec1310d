"""report.md of a reproduction: the paper's setting, ours beside it (every difference stated), the
claims with their numbers and checks, what a claim that does not hold would need, the figures, and
every run's measured quantities."""

import json

from nanomarkov.reproduce.quantities import QUANTITIES


def _cell(value):
    return "n/a" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)


def _setting(paper, scale, grid):
    chosen = paper.scales[scale]
    lines = ["## The setting", "", f"**The paper's:** {paper.citation.get('setting', '(not stated)')}", ""]
    lines += [f"**Ours at scale `{scale}`:** {chosen['about'] or ''}".rstrip(), ""]
    lines += [f"- datasets: {chosen['train']:,} train / {chosen['val']:,} val sequences each"]
    for i, dataset in enumerate(grid["datasets"]):  # the grid's: with a scale's seq_len where it gives one
        shown = {key: value for key, value in dataset.items() if key not in ("train", "val")}
        lines.append(f"  - dataset {i}: `{json.dumps(shown)}`")
    lines.append(f"- seeds: {', '.join(map(str, chosen['seeds']))}")
    lines.append(f"- at this scale, for every run: `{json.dumps(grid['defaults'])}`")
    for e in paper.experiments:
        about = f" {e['about']};" if e["about"] else ""
        lines.append(
            f"- experiment `{e['tag']}`:{about} preset `{e['preset']}`, overrides `{json.dumps(e['overrides'])}`"
        )
    differences = paper.citation.get("differences", [])
    lines += ["", "**Where ours differs from the paper's:**", ""] + [f"- {d}" for d in differences]
    if scale != "paper":
        lines.append(f"- scale `{scale}` is smaller than the paper's (`--scale paper` uses its sizes)")
    return lines


def _claims(results):
    lines = ["## The claims", "", "| claim | paper (source) | ours | check | holds |", "|---|---|---|---|---|"]
    for r in results:
        lines.append(
            f"| **{r['id']}**: {r['claim']} | {r['paper']} ({r['source']}) | {r['ours']}"
            f"{' vs ' + r['against'] if r.get('against') else ''} | `{r['check']}` | "
            f"{'yes' if r['holds'] else '**no**'} |"
        )
    failing = [r for r in results if not r["holds"]]
    if failing:
        lines += ["", "What a claim that does not hold here would need (written before the run):", ""]
        lines += [f"- **{r['id']}**: {r['if_not'] or 'not stated'}" for r in failing]
    return lines


def _figures(figures):
    if not figures:
        return []
    lines = ["## Figures", ""]
    for figure, path in figures:
        title = f"{figure['paper']}: {figure['caption']}".rstrip(": ")
        lines += [f"**{title}** (experiment `{figure['experiment']}`, first finished seed)", ""]
        lines += [f"![{figure['paper']}]({path.as_posix()})" if path else "(not drawn: no finished run)", ""]
    return lines


def _runs(table):
    measured = {name for rows in table.values() for row in rows for name, value in row.items() if value is not None}
    staged = sorted(name for name in measured if "." in name)  # the stage quantities the claims read
    names = [name for name in [*QUANTITIES, *staged] if name in measured]
    lines = ["## Every run", "", "| experiment | run | state | " + " | ".join(names) + " |"]
    lines.append("|---" * (len(names) + 3) + "|")
    for tag, rows in table.items():
        for row in rows:
            cells = [tag, row["run"], _cell(row["state"]), *(_cell(row.get(n)) for n in names)]
            lines.append("| " + " | ".join(cells) + " |")
    return lines


def report_text(paper, scale, grid, table, results, figures, times) -> str:
    """The report as Markdown; times: (seconds of this command, seconds of every call so far, calls)."""
    c = paper.citation
    held = sum(r["holds"] for r in results)
    lines = [f'# {c["authors"]} ({c["year"]}), "{c["title"]}"', ""]
    lines += [f"Reproduced by `nanomarkov reproduce {paper.name} --scale {scale}` from `{paper.path.name}`"]
    lines += [f"({c['url']})." if c.get("url") else "", ""]
    seconds, total, calls = times
    lines += [
        f"**{held} of {len(results)} claims hold** at scale `{scale}`; {seconds:.0f} s for this command, "
        f"{total:.0f} s over the {calls} call(s) that made this folder.",
        "",
    ]
    lines += _setting(paper, scale, grid) + [""] + _claims(results) + [""] + _figures(figures) + _runs(table)
    return "\n".join(lines) + "\n"
