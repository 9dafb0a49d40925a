"""`speechless report RUN_DIR`: one HTML page plus PNG plots (matplotlib) of what a pipeline run produced.

Reads only the run folder (pipeline.json, metrics.json, each stage's metrics.json and token files) and writes
`RUN_DIR/report/` (index.html + *.png, each written atomically). Sections whose stage has not run yet say so.
Optionally renders the page in headless Chromium to `report/screenshot.png` (to look at it, and to test it renders).
"""

from __future__ import annotations

import html
import os
import shutil
import subprocess
from collections import Counter
from pathlib import Path

from speechless.core.errors import RuntimeFailure, UsageError
from speechless.core.io import atomic_path, read_json, read_jsonl, write_text
from speechless.core.metrics import CLAIM_RATIO, claim_checks

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> str:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=90, bbox_inches="tight")
    _plt().close(fig)
    return path.name


def _read_jsonl(path: Path) -> list[dict]:
    return [row for _, row in read_jsonl(path)] if path.is_file() else []


def _metrics(folder: Path) -> dict:
    path = folder / "metrics.json"
    return read_json(path) if path.is_file() else {}


# ------------------------------------------------------------------------------------------------------ plots


def encoder_plots(folder: Path, out: Path) -> list[str]:
    """The encoder step: train and held-out CTC loss per step, and the held-out CER (or phoneme error rate) curve."""
    metrics = _metrics(folder)
    history = metrics.get("history", [])
    if not history:
        return []
    plt = _plt()
    evals = [h for h in history if "eval" in h]
    images = []
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.plot([h["step"] for h in history], [h["loss"] for h in history], label="train CTC loss")
    if evals:
        ax.plot([h["step"] for h in evals], [h["eval"]["loss"] for h in evals], marker="o", label="held-out CTC loss")
    ax.set_yscale("log"), ax.set_xlabel("step"), ax.set_ylabel("CTC loss per unit")
    ax.set_title("Encoder pretraining: CTC loss"), ax.legend()
    images.append(_save(fig, out / "encoder_loss.png"))
    if evals:
        ev = metrics.get("eval", {})
        name = "CER" if ev.get("units", "chars") == "chars" else "phoneme error rate"
        fig, ax = plt.subplots(figsize=(6, 3.2))
        ax.plot([h["step"] for h in evals], [h["eval"]["error_rate"] for h in evals], marker="o")
        for h in evals[-1:]:
            ax.annotate(f"{h['eval']['error_rate']:.3f}", (h["step"], h["eval"]["error_rate"]), textcoords="offset points", xytext=(0, 6))
        ax.set_ylim(0, max(1.0, max(h["eval"]["error_rate"] for h in evals) * 1.05)), ax.set_xlabel("step")
        ax.set_ylabel(f"held-out {name}")
        ax.set_title(f"Encoder pretraining: {name} on held-out split {ev.get('split', '')} (greedy CTC)")
        images.append(_save(fig, out / "encoder_error_rate.png"))
    return images


def stage1_plots(folder: Path, out: Path) -> list[str]:
    """Loss curve, per-codebook utilization over eval steps, and code-usage histograms of the eval split's tokens."""
    metrics = _metrics(folder)
    history = metrics.get("history", [])
    if not history:
        return []
    plt = _plt()
    images = []
    trained = [h for h in history if "train_loss" in h]
    if trained:
        fig, ax = plt.subplots(figsize=(6, 3.2))
        ax.plot([h["step"] for h in trained], [h["train_loss"] for h in trained], label="train loss")
        ax.set_xlabel("step"), ax.set_ylabel("loss"), ax.set_title("Stage 1: RVQ training loss"), ax.legend()
        images.append(_save(fig, out / "stage1_loss.png"))
    evals = [h for h in history if "eval" in h]
    if evals:
        fig, ax = plt.subplots(figsize=(6, 3.2))
        levels = len(evals[0]["eval"]["utilization"])
        for level in range(levels):
            ax.plot([h["step"] for h in evals], [h["eval"]["utilization"][level] for h in evals], marker="o", label=f"codebook {level}")
        size = (read_json(folder / "config.json") if (folder / "config.json").is_file() else {}).get("codebook_size", "all")
        ax.axhline(0.95, color="grey", linestyle="--", linewidth=1, label="bar 0.95")
        ax.set_ylim(0, 1.02), ax.set_xlabel("step"), ax.set_ylabel(f"share of the {size} codes used")
        ax.set_title("Stage 1: held-out utilization per codebook"), ax.legend(fontsize=6, ncol=4)
        images.append(_save(fig, out / "stage1_utilization.png"))
    split = metrics.get("eval", {}).get("split", "dev")
    rows = [row for name in split.split("+") for row in _read_jsonl(folder / "tokens" / f"{name}.jsonl")]  # dev+test: both
    if rows:
        levels = len(rows[0]["codes"])
        fig, (rank_ax, hist_ax) = plt.subplots(1, 2, figsize=(10, 3.4))
        for level in range(levels):
            counts = sorted(Counter(code for row in rows for code in row["codes"][level]).values(), reverse=True)
            rank_ax.plot(range(1, len(counts) + 1), counts, label=f"codebook {level}")
            hist_ax.hist(counts, bins=[2 ** e for e in range(0, 13)], histtype="step", label=f"codebook {level}")
        rank_ax.set_yscale("log"), rank_ax.set_xlabel("codes, most used first"), rank_ax.set_ylabel("frames using the code")
        hist_ax.set_xscale("log"), hist_ax.set_xlabel("frames using a code"), hist_ax.set_ylabel("codes (used at least once)")
        frames = sum(len(r["codes"][0]) for r in rows)
        fig.suptitle(f"Stage 1: code usage on the {split} split ({frames} frames)"), rank_ax.legend(fontsize=6, ncol=2)
        images.append(_save(fig, out / "stage1_code_usage.png"))
    return images


def stage2_plots(folder: Path, stage1_folder: Path, out: Path) -> list[str]:
    """Probe CER on real vs generated tokens, and generated vs real duration per held-out utterance."""
    ev = _metrics(folder).get("eval", {})
    if "probe_cer_real" not in ev:
        return []
    plt = _plt()
    images = []
    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    values = [ev["probe_cer_real"], ev["probe_cer_generated"]]
    ax.bar(["real tokens", "stage-2 tokens"], values, color=["#4c72b0", "#dd8452"])
    ax.axhline(1.25 * ev["probe_cer_real"], color="grey", linestyle="--", label="1.25 x real")
    for x, v in enumerate(values):
        ax.text(x, v, f"{v:.3f}", ha="center", va="bottom")
    ax.set_ylabel("probe CER"), ax.set_title(f"Stage 2 round trip ({ev.get('utterances')} held-out utterances)"), ax.legend()
    images.append(_save(fig, out / "stage2_probe_cer.png"))
    generated = {r["id"]: r["frames"] for r in _read_jsonl(folder / "tokens" / f"generated_{ev.get('split', 'test')}.jsonl")}
    real = {r["id"]: r["frames"] for r in _read_jsonl(stage1_folder / "tokens" / f"{ev.get('split', 'test')}.jsonl")}
    pairs = [(real[i], generated[i]) for i in generated if i in real]
    if pairs:
        fig, ax = plt.subplots(figsize=(4.5, 4))
        ax.scatter([p[0] for p in pairs], [p[1] for p in pairs], s=8, alpha=0.6)
        top = max(max(p) for p in pairs)
        ax.plot([0, top], [0, top], color="grey", linestyle="--")
        ax.set_xlabel("real frames"), ax.set_ylabel("generated frames"), ax.set_title("Stage 2: duration per utterance")
        images.append(_save(fig, out / "stage2_duration.png"))
    return images


def stage3_plots(folder: Path, out: Path) -> list[str]:
    """Task scores on held-out real speech of every variant: the adapter trained on stage-2 speech beside the one
    trained on real speech (the topline) with the 0.9 x topline mark, and the closed tasks' no-listening baselines."""
    ev = _metrics(folder).get("eval", {})
    comparison = ev.get("comparison")
    if not comparison:
        return []
    plt = _plt()
    runs = list(comparison)
    tasks = sorted({task for run in runs for task in comparison[run].get("scores", {})})
    if not tasks:
        return []
    fig, ax = plt.subplots(figsize=(7.5, 3.4))
    width = 0.8 / len(runs)
    for index, run in enumerate(runs):
        scores = comparison[run].get("scores", {})
        ax.bar([t + index * width for t in range(len(tasks))], [scores.get(task, {}).get("score", 0) for task in tasks],
               width=width, label=run)
    topline = next((run for run in runs if run.startswith("real_speech_topline/")), None)
    baselines = ev.get("no_listening_baselines") or {}
    for t, task in enumerate(tasks):
        span = (t - width / 2, t + 0.8 - width / 2)
        if topline and task in comparison[topline].get("scores", {}):
            ax.hlines(CLAIM_RATIO * comparison[topline]["scores"][task]["score"], *span, colors="k", linestyles="--",
                      label=f"{CLAIM_RATIO} x topline" if t == 0 else None)
        for key, style in (("commonest_answer", ":"), ("commonest_answer_for_verb", "-.")):
            if key in baselines.get(task, {}):
                ax.hlines(baselines[task][key], *span, colors="r", linestyles=style,
                          label=key.replace("_", " ") + " (no listening)" if task == min(baselines) else None)
    ax.set_xticks([t + 0.4 - width / 2 for t in range(len(tasks))], tasks)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("score (higher is better)"), ax.set_title("Stage 3: task scores on held-out real speech")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    return [_save(fig, out / "stage3_tasks.png")]


# ------------------------------------------------------------------------------------------------------ bars

#: The bars the demo is held to (issue "a faithful demo"): stage-1 codebook utilization, the judge's CER on real
#: held-out tokens, stage-2 tokens read at most this many times worse, and stage 3 on stage-2 speech at least this
#: share of the same adapter trained on real speech on every task.
UTILIZATION_BAR = 0.95
JUDGE_CER_BAR = 0.15
ROUND_TRIP_RATIO_BAR = 1.25


def _bar(value, ok: bool | None) -> str:
    return "-" if value is None else ("meets" if ok else "misses")


def summary_rows(run_dir: Path) -> list[tuple[str, str, str, str]]:
    """One line per step: (step, headline figure, bar, meets/misses), from the run folder's metrics files."""
    rows = []
    ev0 = _metrics(run_dir / "encoder").get("eval", {})
    if ev0:
        rows.append(("encoder", f"held-out {ev0.get('units', '')} error rate {_fmt(ev0.get('error_rate'))}", "-", "-"))
    ev1 = _metrics(run_dir / "stage1").get("eval", {})
    if ev1.get("utilization"):
        low = min(ev1["utilization"])
        rows.append(("stage 1", f"codebook utilization min {low:.3f} (NMSE {_fmt(ev1.get('nmse'))}, {ev1.get('frames')} held-out frames)",
                     f">= {UTILIZATION_BAR} on every codebook", _bar(low, low >= UTILIZATION_BAR)))
    ev2 = _metrics(run_dir / "stage2").get("eval", {})
    if ev2.get("judge") == "whisper" and "whisper" in ev2:  # the bar read on Whisper's decoder
        judge = ev2["whisper"]
        real, generated = judge["cer_real"]["value"], judge["cer_generated"]["value"]
        ratio = judge["cer_stage2_cost"]["ratio"]
        rows.append(("stage 2 judge", f"Whisper's decoder: CER on real held-out tokens {real:.3f}", f"<= {JUDGE_CER_BAR}",
                     _bar(real, real <= JUDGE_CER_BAR)))
        rows.append(("stage 2 round trip", f"Whisper's decoder: CER on stage-2 tokens {generated:.3f} ({ratio['value']:.2f} x real, "
                     f"95 % interval {ratio['low']:.2f}-{ratio['high']:.2f})", f"<= {ROUND_TRIP_RATIO_BAR} x real",
                     _bar(ratio["value"], ratio["value"] <= ROUND_TRIP_RATIO_BAR)))
    elif "probe_cer_real" in ev2:
        real, generated = ev2["probe_cer_real"], ev2["probe_cer_generated"]
        rows.append(("stage 2 judge", f"CER on real held-out tokens {real:.3f}", f"<= {JUDGE_CER_BAR}", _bar(real, real <= JUDGE_CER_BAR)))
        ratio = ev2.get("probe_cer_ratio", generated / real if real else None)  # the recipe's, from unrounded CERs
        interval = ev2.get("probe_cer_ratio_interval")
        spread = f", 95 % interval {interval['low']:.2f}-{interval['high']:.2f}" if interval else ""
        rows.append(("stage 2 round trip", f"CER on stage-2 tokens {generated:.3f} ({_fmt(ratio)} x real{spread})",
                     f"<= {ROUND_TRIP_RATIO_BAR} x real", _bar(ratio, ratio is not None and ratio <= ROUND_TRIP_RATIO_BAR)))
    if "whisper" in ev2:
        judge = ev2["whisper"]
        rows.append(("stage 2, Whisper's decoder", "WER " + ", ".join(
            f"{label} {judge['wer_' + name]['value']:.3f} [{judge['wer_' + name]['low']:.3f}, {judge['wer_' + name]['high']:.3f}]"
            for name, label in (("continuous", "continuous states"), ("real", "real tokens"), ("generated", "stage-2 tokens"))),
            "-", "-"))
    ev3 = _metrics(run_dir / "stage3").get("eval", {})
    main = ev3.get("main", "")
    scores = ((ev3.get("comparison") or {}).get(main) or {}).get("scores", {})
    checks = claim_checks(ev3)["tasks"]
    if scores and not checks:
        rows.append(("stage 3", f"{main} on held-out real speech: " + ", ".join(f"{t} {v.get('score', 0):.3f}" for t, v in scores.items()),
                     f">= {CLAIM_RATIO} x real-speech topline", "- (no topline: compare.real_speech_topline is off)"))
    for task, check in checks.items():
        ratio = check["ratio_to_topline"]
        rows.append((f"stage 3 {task}", f"{check['score']:.3f} on stage-2 speech, {_fmt(ratio)} x real-speech topline",
                     f">= {CLAIM_RATIO} x topline", _bar(ratio, check["meets_ratio"])))
        if "best_no_listening" in check:
            rows.append((f"stage 3 {task}", f"{check['score']:.3f} vs no listening {check['best_no_listening']:.3f}",
                         "above every no-listening baseline", _bar(check["best_no_listening"], check["above_no_listening"])))
    seeds = _metrics(run_dir / "stage3_seeds").get("eval", {})
    if seeds.get("seeds"):
        rows.append(("stage 3 over seeds", f"claim holds at {seeds['holds_at']} of {len(seeds['seeds'])} seeds; mean ratio "
                     + ", ".join(f"{t} {v:.3f}" for t, v in seeds["mean_ratio_to_topline"].items()),
                     "holds at every seed", _bar(seeds["holds_at"], seeds["holds_at"] == len(seeds["seeds"]))))
    return rows


# ------------------------------------------------------------------------------------------------------ page


def _table(rows: list[tuple]) -> str:
    cells = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table>{cells}</table>"


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list):
        return " ".join(_fmt(v) for v in value)
    return str(value)


def _section(title: str, numbers: dict, images: list[str], missing: str) -> str:
    if not numbers and not images:
        return f"<h2>{html.escape(title)}</h2><p class='missing'>{html.escape(missing)}</p>"
    body = _table([(key, _fmt(value)) for key, value in numbers.items()]) if numbers else ""
    body += "".join(f"<img src='{html.escape(name)}' alt='{html.escape(name)}'>" for name in images)
    return f"<h2>{html.escape(title)}</h2>{body}"


def seeds_section(run_dir: Path) -> str:
    """Stage 3 over seeds: per seed and task the score on stage-2 speech, the real-speech topline's and their ratio,
    whether it is above the no-listening baselines, and whether the claim holds; then the means."""
    ev = _metrics(run_dir / "stage3_seeds").get("eval", {})
    if not ev.get("seeds"):
        return ""
    tasks = list(ev["mean_ratio_to_topline"])

    def cell(check: dict) -> str:
        text = f"{_fmt(check['score'])} / {_fmt(check['real_speech_topline'])} = {_fmt(check['ratio_to_topline'])}"
        if "above_no_listening" in check:
            text += f" ({'above' if check['above_no_listening'] else 'not above'} no listening {_fmt(check['best_no_listening'])})"
        return text

    rows = [("seed", *tasks, "claim holds")]
    for seed, check in ev["seeds"].items():
        rows.append((seed, *(cell(check["tasks"][t]) if t in check["tasks"] else "-" for t in tasks), _fmt(check["holds"])))
    rows.append(("mean", *(f"{_fmt(ev['mean_score'][t])} / {_fmt(ev['mean_real_speech_topline'][t])} = {_fmt(ev['mean_ratio_to_topline'][t])}"
                           for t in tasks), f"at {ev['holds_at']} of {len(ev['seeds'])} seeds"))
    return (f"<h2>Stage 3 over {len(ev['seeds'])} seeds (held-out real speech)</h2><p>Each cell: score on stage-2 speech / "
            f"real-speech topline = ratio (claim: >= {CLAIM_RATIO} on every task, and above every no-listening baseline "
            "on closed tasks, at every seed).</p>" + _table(rows))


def write_report(run_dir: str | Path) -> Path:
    """Write RUN_DIR/report/index.html and its PNGs; returns the page's path."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UsageError(f"{run_dir}: run folder not found; give the folder `speechless run` wrote (run.out_dir)")
    state = read_json(run_dir / "pipeline.json") if (run_dir / "pipeline.json").is_file() else {"steps": {}}
    out = run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    s0, s1, s2, s3 = run_dir / "encoder", run_dir / "stage1", run_dir / "stage2", run_dir / "stage3"
    ev0 = _metrics(s0).get("eval", {})
    numbers0 = {k: ev0[k] for k in ("split", "utterances", "units", "error_rate", "loss") if k in ev0}
    model0 = _metrics(s0).get("model", {})
    numbers0.update({f"model {k}": model0[k] for k in ("hidden_size", "num_hidden_layers", "parameters") if k in model0})
    encoder_section = (_section("Encoder pretraining (held-out)", numbers0, encoder_plots(s0, out), "the encoder step has not run")
                       if "encoder" in state["steps"] or s0.is_dir() else "")
    ev1, ev2, ev3 = (_metrics(f).get("eval", {}) for f in (s1, s2, s3))
    numbers1 = {k: ev1[k] for k in ("split", "frames", "mse", "nmse", "cosine", "centered_cosine", "utilization") if k in ev1}
    numbers2 = {k: ev2[k] for k in ("split", "utterances", "probe_cer_real", "probe_cer_generated", "probe_cer_ratio",
                                    "dtw_centered_cosine") if k in ev2}
    if "duration" in ev2:
        numbers2["duration ratio (generated / real)"] = ev2["duration"].get("ratio_mean")
    for key in ("wer_continuous", "wer_real", "wer_generated", "cer_continuous", "cer_real", "cer_generated"):
        if key in ev2.get("whisper", {}):
            v = ev2["whisper"][key]
            numbers2[f"Whisper decoder {key.replace('_', ' ')}"] = f"{v['value']} [{v['low']}, {v['high']}] (n {v['n']})"
    numbers3 = {k: v for k, v in ev3.items() if not isinstance(v, (dict, list))}
    for run, entry in (ev3.get("comparison") or {}).items():
        scores = entry.get("scores", {})
        ppl = entry.get("text_perplexity") or {}
        numbers3[run] = " ".join(f"{task} {value.get('score', 0):.3f}" for task, value in scores.items()) + (
            f"; text perplexity change {ppl['relative_change']:+.2%}" if "relative_change" in ppl else "")
    for kind, tasks in (ev3.get("topline_comparison") or {}).items():  # synthetic-speech scores / the real-speech topline's
        numbers3[f"ratio to real-speech topline ({kind})"] = " ".join(
            f"{task} {row['ratio_to_topline']}" for task, row in tasks.items())
    for task, guesses in (ev3.get("no_listening_baselines") or {}).items():
        numbers3[f"{task} without listening"] = " ".join(f"{k.replace('_', ' ')} {v}" for k, v in guesses.items() if k != "n")
    summary = summary_rows(run_dir)
    summary_html = ("<h2>Summary</h2>" + _table([("step", "headline figure", "bar", "")] + summary)) if summary else ""
    steps = _table([("step", "revision", "seconds", "pushed")] + [
        (name, rec.get("revision", "")[:12], rec.get("seconds"), rec.get("pushed") or "") for name, rec in state["steps"].items()])
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>speechless report: {html.escape(run_dir.name)}</title>
<style>body{{font-family:sans-serif;max-width:1000px;margin:2em auto;color:#222}} table{{border-collapse:collapse;margin:.5em 0}}
td{{border:1px solid #ccc;padding:2px 8px;font-size:13px}} img{{max-width:100%;display:block;margin:.6em 0}} .missing{{color:#a00}}</style>
</head><body><h1>speechless run <code>{html.escape(str(run_dir))}</code></h1>
{summary_html}
<p>Steps (output revision = sha256 of the step's main file; total {state.get('last_run_seconds', '?')} s in the last run):</p>{steps}
{encoder_section}
{_section("Stage 1: speech tokenizer (held-out)", numbers1, stage1_plots(s1, out), "stage 1 has not run in this folder")}
{_section("Stage 2: text to semantic tokens (round trip)", numbers2, stage2_plots(s2, s1, out), "stage 2 has not run in this folder")}
{_section("Stage 3: LLM adaptation (held-out real speech)", numbers3, stage3_plots(s3, out), "stage 3 has not run in this folder")}
{seeds_section(run_dir)}
</body></html>"""
    page_path = out / "index.html"
    write_text(page_path, page)
    return page_path


def find_chromium() -> str | None:
    return next((found for name in CHROMIUM_NAMES if (found := shutil.which(name))), None)


def estimated_height(page_html: str) -> int:
    """Pixels the page takes at the report's width: plots ~340 px, table rows ~24 px, headings ~60 px (the
    screenshot's height, so it ends where the page does rather than in an empty half-page)."""
    return 160 + 340 * page_html.count("<img") + 24 * page_html.count("<tr>") + 60 * page_html.count("<h2>")


def screenshot(page: Path, target: Path, width: int = 1100, height: int | None = None) -> Path:
    """Render the page in headless Chromium and save a PNG screenshot (height None = `estimated_height`)."""
    height = height or estimated_height(page.read_text(encoding="utf-8"))
    binary = find_chromium()
    if binary is None:
        raise UsageError("no Chromium found for the screenshot; install it (apt-get install chromium) or leave out --screenshot")
    tmp = target.with_name(f".{target.stem}.partial.png")  # Chromium picks the image format from the extension
    cmd = [binary, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", f"--window-size={width},{height}",
           f"--screenshot={tmp}", page.resolve().as_uri()]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if done.returncode != 0 or not tmp.is_file() or tmp.stat().st_size == 0:
            raise RuntimeFailure(f"chromium could not render {page}: {(done.stderr.strip().splitlines() or ['no output'])[-1]}")
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target
