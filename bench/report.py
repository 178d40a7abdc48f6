"""Turn a benchmark run's results (a JSON-able dict, see `bench.__main__`) into a text table, a JSON file and
a PNG plot. Every figure of ours is shown next to its anchors from the same run, as a value and a ratio."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# Targets of the "fast on every CPU" issue (#11), as ratios to llama.cpp measured in the same run: one stream against
# llama-cpp-python (tokens/s at least, TTFT at most this multiple of its), n streams against llama-server `-np n`
# (tokens/s at least, TTFT p50 at most these milliseconds).
TARGET_ONE_STREAM_RATIO = 1.0
TARGET_ONE_STREAM_TTFT_RATIO = 1.5
TARGET_STREAMS: dict[int, tuple[float, float]] = {16: (2.0, 300.0), 64: (2.5, 1000.0)}
# From the API issue: the second turn of a ~1,500-token conversation starts in at most this share of the first's TTFT.
TARGET_PREFIX_RATIO = 0.3


def _f(x: float | None, digits: int = 1) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _ratio(a: float | None, b: float | None) -> str:
    return "-" if not a or not b else f"{a / b:.2f}x"


def _skipped(entry: Any) -> str | None:
    return entry.get("skipped") if isinstance(entry, dict) else None


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    fmt = "  ".join(f"{{:>{w}}}" for w in widths)
    return "\n".join([fmt.format(*header), fmt.format(*("-" * w for w in widths)), *(fmt.format(*r) for r in rows)])


def _ceiling_section(c: dict[str, Any]) -> str:
    if reason := _skipped(c):
        return f"Ceiling: not measured ({reason})"
    lines = [
        f"Ceiling (measured, {c['threads']} threads): read bandwidth {c['bandwidth_gbs']:.1f} GB/s; "
        f"{c['params'] / 1e6:.1f}M params"
    ]
    rows = [
        [d, _f(g, 0), _f(c["single_stream_tokens_per_s"].get(d)), _f(c["batch_tokens_per_s"].get(d))]
        for d, g in c["matmul_gflops"].items()
    ]
    rows += [
        [f"{mode} (weight-only)", "-", _f(tps), "-"]
        for mode, tps in c["single_stream_tokens_per_s"].items()
        if mode not in c["matmul_gflops"] and mode != "gguf"
    ]
    if "gguf" in c["single_stream_tokens_per_s"]:
        rows.append(["gguf (llama.cpp)", "-", _f(c["single_stream_tokens_per_s"]["gguf"]), "-"])
    lines.append(_table(["weights", "matmul GFLOP/s", "1-stream bound tok/s", "batch bound tok/s"], rows))
    return "\n".join(lines)


def _serving_section(results: dict[str, Any]) -> str:
    anchors = results.get("anchors", {})
    server = anchors.get("llama_server", {})
    server_levels = {} if _skipped(server) else server.get("levels", {})
    lcp = anchors.get("llama_cpp_python", {})
    ceiling = results.get("ceiling", {})
    transformers = anchors.get("transformers", {})
    dtypes = list(results.get("serving", {})) or list(transformers) or (["-"] if server_levels else [])
    out = []
    for dtype in dtypes:
        ours = results.get("serving", {}).get(dtype, {}).get("ours", {})
        if reason := _skipped(ours):
            out.append(f"Serving {dtype}: ours not measured ({reason})")
            ours = {}
        tf = transformers.get(dtype, {})
        tf_by_c = {} if _skipped(tf) else {1: tf.get("batch1"), 16: tf.get("batch16")}
        levels = sorted({int(c) for c in [*ours, *server_levels]} | {c for c, r in tf_by_c.items() if r})
        rows = []
        for ci in levels:
            s, ls, tfr = ours.get(str(ci)) or {}, server_levels.get(str(ci)) or {}, tf_by_c.get(ci) or {}
            tps = s.get("tokens_per_s")
            bound = (
                ceiling.get("single_stream_tokens_per_s", {}).get(dtype)
                if ci == 1
                else ceiling.get("batch_tokens_per_s", {}).get(dtype)
            )
            rows.append(
                [
                    str(ci),
                    _f(tps),
                    f"{_f(s.get('ttft_p50_ms'), 0)}/{_f(s.get('ttft_p95_ms'), 0)}",
                    f"{_f(s.get('itl_p50_ms'))}/{_f(s.get('itl_p95_ms'))}",
                    str(s.get("errors", "-")),
                    _f(s.get("mean_tokens_per_request"), 0),
                    _f(s.get("mean_batch_size")),
                    _f(ls.get("tokens_per_s")),
                    _f(ls.get("ttft_p50_ms"), 0),
                    _ratio(tps, ls.get("tokens_per_s")),
                    _f(tfr.get("tokens_per_s")),
                    _ratio(tps, tfr.get("tokens_per_s")),
                    "-" if not (bound and tps) else f"{100 * tps / bound:.0f}%",
                ]
            )
        entry = results.get("serving", {}).get(dtype, {})
        eos = "ignore_eos" if entry.get("ignore_eos") else "stops at EOS"
        kernels = (entry.get("served") or {}).get("linear_kernels")
        on = f" on {kernels}" if kernels else ""
        out.append(
            f"Serving {dtype} (ours: /v1/generate SSE, {eos}{on}; llama-server: Q4_1 GGUF under the same load, "
            "ignore_eos; HF generate: static batch of 1 and 16, min_new_tokens):"
        )
        out.append(
            _table(
                [
                    "conc",
                    "ours tok/s",
                    "TTFT p50/p95 ms",
                    "ITL p50/p95 ms",
                    "err",
                    "tok/req",
                    "batch",
                    "llama-srv tok/s",
                    "l-s TTFT50",
                    "ours/llama.cpp",
                    "HF tok/s",
                    "ours/HF",
                    "of ceiling",
                ],
                rows,
            )
        )
        one = (ours.get("1") or {}).get("tokens_per_s")
        if lcp and not _skipped(lcp):
            out.append(
                f"  llama-cpp-python, one stream: {lcp['tokens_per_s']:.1f} tok/s "
                f"(TTFT {lcp['ttft_ms']:.0f} ms); ours/llama-cpp-python {_ratio(one, lcp['tokens_per_s'])}"
            )
    if reason := _skipped(server):
        out.append(f"  llama-server anchor not run: {reason}")
    if reason := _skipped(lcp):
        out.append(f"  llama-cpp-python anchor not run: {reason}")
    for dtype, tf in transformers.items():
        if reason := _skipped(tf):
            out.append(f"  transformers anchor ({dtype}) not run: {reason}")
    return "\n".join(out)


def _pass(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def _targets_section(results: dict[str, Any]) -> str:
    """Each served mode against the issue's targets, where this run measured both sides of a ratio."""
    anchors = results.get("anchors", {})
    lcp = anchors.get("llama_cpp_python", {})
    server = anchors.get("llama_server", {})
    server_levels = {} if _skipped(server) else server.get("levels", {})
    lines = []
    for mode, entry in results.get("serving", {}).items():
        ours = entry.get("ours", {})
        if not ours or _skipped(ours):
            continue
        checks = []
        one = ours.get("1") or {}
        if one and lcp and not _skipped(lcp):
            ratio = one["tokens_per_s"] / lcp["tokens_per_s"]
            checks.append(
                f"one stream {ratio:.2f}x llama-cpp-python (>= {TARGET_ONE_STREAM_RATIO:g}x): "
                + _pass(ratio >= TARGET_ONE_STREAM_RATIO)
            )
            if one.get("ttft_p50_ms") is not None and lcp.get("ttft_ms"):
                ttft = one["ttft_p50_ms"] / lcp["ttft_ms"]
                checks.append(
                    f"TTFT {ttft:.2f}x its (<= {TARGET_ONE_STREAM_TTFT_RATIO:g}x): "
                    + _pass(ttft <= TARGET_ONE_STREAM_TTFT_RATIO)
                )
        for c, (min_ratio, max_ttft) in TARGET_STREAMS.items():
            s, ls = ours.get(str(c)) or {}, server_levels.get(str(c)) or {}
            if not s or not ls.get("tokens_per_s"):
                continue
            ratio, ttft = s["tokens_per_s"] / ls["tokens_per_s"], s.get("ttft_p50_ms")
            ok = ratio >= min_ratio and ttft is not None and ttft <= max_ttft
            checks.append(
                f"{c} streams {ratio:.2f}x llama-server (>= {min_ratio:g}x), TTFT p50 {_f(ttft, 0)} ms "
                f"(<= {max_ttft:g}): {_pass(ok)}"
            )
        if checks:
            lines.append(f"  {mode}: " + "; ".join(checks))
    return "\n".join(["Targets (issue #11, against llama.cpp in this run):", *lines]) if lines else ""


def _training_section(training: dict[str, Any]) -> str:
    if not training:
        return ""
    if reason := _skipped(training):
        return f"Training: not measured ({reason})"

    def mem(r: dict[str, Any]) -> str:  # peak RSS (what the steps added on top of the built model)
        if r.get("peak_rss_mib") is None:
            return "-"
        return f"{r['peak_rss_mib']:.0f}" + (f" (+{r['train_mib']:.0f})" if r.get("train_mib") is not None else "")

    rows = []
    for name, t in training.get("runs", {}).items():
        hf = t.get("transformers", {})
        # Our trainer's options (compile, activation checkpointing, chunked loss) each get a row next to the anchor.
        variants = [(f"{name} +{v}", r) for v, r in t.get("ours_variants", {}).items()]
        for label, ours in [(name, t.get("ours", {})), *variants]:
            rows.append(
                [
                    label,
                    f"{t['batch_size']}x{t['seq_len']}",
                    _f(ours.get("tokens_per_s"), 0),
                    _f(ours.get("mfu_pct"), 1),
                    mem(ours),
                    _f(hf.get("tokens_per_s"), 0),
                    _f(hf.get("mfu_pct"), 1),
                    mem(hf),
                    _ratio(ours.get("tokens_per_s"), hf.get("tokens_per_s")),
                ]
            )
    head = (
        f"Training step (forward, backward, clip, fused AdamW; fp32 weights, bf16 = autocast; "
        f"MFU against measured matmul FLOP/s; MiB = peak RSS (+ added by the steps), one process per row)\n"
        f"  ours: {training.get('ours_impl')}\n  anchor: {training.get('anchor_impl')}"
    )
    header = ["config", "batch", "ours tok/s", "ours MFU %", "ours MiB", "HF tok/s", "HF MFU %", "HF MiB", "ours/HF"]
    return head + "\n" + _table(header, rows)


def _prefix_reuse_section(pr: dict[str, Any]) -> str:
    if reason := _skipped(pr):
        return f"Prefix reuse: not measured ({reason})"
    rows = [
        ["1", str(pr["turn1_prompt_tokens"]), "0", _f(pr["turn1_ttft_ms"], 0)],
        ["2", str(pr["turn2_prompt_tokens"]), str(pr["turn2_reused_tokens"]), _f(pr["turn2_ttft_ms"], 0)],
        ["2, cold", str(pr["turn2_prompt_tokens"]), "0", _f(pr.get("turn2_cold_ttft_ms"), 0)],
    ]
    ratio, target = pr["ratio"], pr.get("target_ratio", TARGET_PREFIX_RATIO)
    head = (
        f"Prefix reuse (engine in-process, {pr['dtype']}, {pr['threads']} threads, prefill chunk "
        f"{pr['prefill_chunk']}, median of {pr['runs']}; cold = the same prompt on a fresh engine):"
    )
    verdict = (
        f"  turn 2 / turn 1 TTFT {ratio:.2f}x (target <= {target:g}x on a ~1,500-token conversation): "
        f"{'PASS' if ratio <= target else 'MISS'}"
    )
    return "\n".join([head, _table(["turn", "prompt tok", "reused", "TTFT ms"], rows), verdict])


def _structured_section(st: dict[str, Any]) -> str:
    if reason := _skipped(st):
        return f"Structured output: not measured ({reason})"
    rows = []
    for name, f in st.get("formats", {}).items():
        rows.append(
            [
                name,
                _f(f["compile_ms"]),
                _f(f["first_mask_ms"], 2),
                f"{_f(f['mask_ms_p50'], 3)}/{_f(f['mask_ms_p95'], 3)}",
                _f(f.get("fill_ms_p50"), 3),
                _f(f.get("accept_ms_p50"), 3),
                str(f["steps"]),
                _f(f.get("decode_ms_per_token")),
                _f(st.get("plain_decode_ms_per_token")),
                "yes" if f.get("valid_json") else "no",
            ]
        )
    head = (
        f"Structured output (llguidance mask per decode step, engine in-process, greedy, {st['dtype']}, "
        f"{st['threads']} threads; tokenizer table {_f(st.get('tokenizer_table_ms'), 0)} ms once per model):"
    )
    header = [
        "format",
        "compile ms",
        "1st mask ms",
        "mask ms/step p50/p95",
        "llg fill p50",
        "accept p50",
        "steps",
        "decode ms/tok",
        "plain ms/tok",
        "JSON",
    ]
    return head + "\n" + _table(header, rows)


def format_report(results: dict[str, Any]) -> str:
    meta = results.get("meta", {})
    parts = [
        f"smollm benchmark {meta.get('date', '')} on {meta.get('machine', '')}; command: {meta.get('command', '')}"
    ]
    if versions := results.get("anchors", {}).get("versions"):
        parts[0] += "\nanchors: " + ", ".join(f"{k} {v}" for k, v in versions.items())
    for section in (
        _ceiling_section(results["ceiling"]) if "ceiling" in results else "",
        _serving_section(results) if "serving" in results or "anchors" in results else "",
        _targets_section(results),
        _training_section(results.get("training", {})),
        _prefix_reuse_section(results["prefix_reuse"]) if "prefix_reuse" in results else "",
        _structured_section(results["structured"]) if "structured" in results else "",
    ):
        if section:
            parts.append(section)
    return "\n\n".join(parts)


def write_json(results: dict[str, Any], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2, sort_keys=False) + "\n")
    return path


def plot(results: dict[str, Any], path: Path) -> Path:
    """Tokens/s and TTFT p50 against concurrency for ours (each dtype) and the anchors. Raises ImportError
    when matplotlib is missing."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import ScalarFormatter

    fig, (ax_tps, ax_ttft) = plt.subplots(1, 2, figsize=(12, 4.5))
    anchors = results.get("anchors", {})

    def line(levels: dict[str, Any], label: str, style: str) -> None:
        cs = sorted(int(c) for c in levels)
        ax_tps.plot(cs, [levels[str(c)]["tokens_per_s"] for c in cs], style, label=label)
        ttft = [(c, levels[str(c)]["ttft_p50_ms"]) for c in cs if levels[str(c)]["ttft_p50_ms"] is not None]
        ax_ttft.plot([c for c, _ in ttft], [t for _, t in ttft], style, label=label)

    for dtype, entry in results.get("serving", {}).items():
        ours = entry.get("ours", {})
        if ours and not _skipped(ours):
            line(ours, f"ours {dtype}", "o-")
    server = anchors.get("llama_server", {})
    if server and not _skipped(server):
        line(server["levels"], "llama-server Q4_1", "s--")
    for dtype, tf in anchors.get("transformers", {}).items():
        if tf and not _skipped(tf):
            pts = [(r["batch"], r) for r in (tf.get("batch1"), tf.get("batch16")) if r]
            ax_tps.plot([b for b, _ in pts], [r["tokens_per_s"] for _, r in pts], "^:", label=f"HF generate {dtype}")
            ax_ttft.plot([b for b, _ in pts], [r["ttft_ms"] for _, r in pts], "^:", label=f"HF generate {dtype}")
    lcp = anchors.get("llama_cpp_python", {})
    if lcp and not _skipped(lcp):
        ax_tps.plot([1], [lcp["tokens_per_s"]], "D", label="llama-cpp-python Q4_1")
        ax_ttft.plot([1], [lcp["ttft_ms"]], "D", label="llama-cpp-python Q4_1")
    for ax, ylabel in ((ax_tps, "generated tokens/s (aggregate)"), (ax_ttft, "time to first token p50 (ms)")):
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.set_xlabel("concurrent streams")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    ax_ttft.set_yscale("log")
    meta = results.get("meta", {})
    fig.suptitle(f"SmolLM2-135M-Instruct serving, {meta.get('machine', '')}, {meta.get('date', '')}", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
