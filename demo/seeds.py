"""The table over seeds: every metric's mean and standard deviation for each run (SRA, baseline), the
difference of the means, and whether that difference is larger than the spread between seeds."""
import numpy as np


def metrics_of(run, block):
    """(name, value, is a share) of the metrics a run's entry in metrics.json gives; `block` is the aligned one."""
    return [("conditional accuracy", run["conditional_accuracy"], True),
            ("Frechet distance", run["frechet_distance"], False),
            (f"probe at block {block}, mean over t", run["probe_summary"][f"block_{block}"], True),
            ("probe at the best block, mean over t", run["probe_summary"]["best_block"], True)]


def summarise(per_seed, block):
    """per_seed: {seed: metrics.json dict} of two or more seeds. Returns {"seeds", "runs", "rows"}; a row holds
    per run the values, mean and std (ddof 1), and with two runs "difference" (first - second mean) and
    "beyond_spread" (|difference| > the larger of the two runs' stds)."""
    seeds = sorted(per_seed)
    if len(seeds) < 2:
        raise ValueError(f"a spread needs two or more seeds, got {seeds}")
    names = list(per_seed[seeds[0]]["runs"])
    rows = []
    for index, (metric, _, share) in enumerate(metrics_of(per_seed[seeds[0]]["runs"][names[0]], block)):
        row = {"metric": metric, "share": share, "runs": {}}
        for name in names:
            values = [metrics_of(per_seed[seed]["runs"][name], block)[index][1] for seed in seeds]
            row["runs"][name] = {"values": values, "mean": float(np.mean(values)), "std": float(np.std(values, ddof=1))}
        if len(names) == 2:
            first, second = (row["runs"][name] for name in names)
            row["difference"] = first["mean"] - second["mean"]
            row["beyond_spread"] = bool(abs(row["difference"]) > max(first["std"], second["std"]))
        rows.append(row)
    return {"seeds": seeds, "runs": names, "rows": rows}


def markdown(table):
    """The table as markdown: one line per metric."""
    def number(value, share, sign=""):
        """A share as a percentage (a signed difference of shares in points), anything else with 2 decimals."""
        if share:
            return f"{100 * value:{sign}.1f}" + (" pt" if sign else "%")
        return f"{value:{sign}.2f}"

    names = table["runs"]
    header = ["metric", *(f"{name} (mean ± std)" for name in names)]
    if len(names) == 2:
        header += [f"{names[0]} - {names[1]}", "beyond the seed spread?"]
    lines = [f"seeds {', '.join(map(str, table['seeds']))}", "",
             "| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for row in table["rows"]:
        cells = [row["metric"]]
        for name in names:
            run = row["runs"][name]
            cells.append(f"{number(run['mean'], row['share'])} ± {number(run['std'], row['share'])}")
        if "difference" in row:
            cells += [number(row["difference"], row["share"], "+"), "yes" if row["beyond_spread"] else "no"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
