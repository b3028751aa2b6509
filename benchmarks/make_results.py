"""Assemble benchmarks/RESULTS.md from the per-topic result files in benchmarks/results/ (each
written by its benchmark script and holding only numbers that script measured). Headings are
demoted one level and image links re-pointed, so RESULTS.md renders on its own.

    .venv/bin/python benchmarks/make_results.py
"""
from __future__ import annotations

import re
from pathlib import Path

HERE = Path(__file__).resolve().parent
ORDER = [   # (file, section title)
    ("headlines.md", "Headlines"),
    ("zoo.md", "Any architecture: the model zoo beside Torch-Pruning"),
    ("reliability.md", "Reliability: faults and bad input"),
    ("llama_kjv.md", "LLaMA on the KJV: pruning while training vs the alternatives"),
    ("llama_fold_sweep.md", "LLaMA: folding vs L2 pruning per unit kind"),
    ("transformer_perf.md", "Transformer step time, statistics overhead and torch.compile"),
    ("event_cost.md", "The cost of one pruning event at 100M parameters"),
    ("kernels.md", "Kernels"),
    ("mnistnet.md", "One-shot pruning of the pretrained MNISTNet"),
    ("perf.md", "Training-time performance and the Torch-Pruning peer"),
    ("projective_perf.md", "Projective scoring speed"),
    ("method_configs.md", "The methods during training (one run per config)"),
    ("cob.md", "Reproduction: change of basis with TSRA"),
    ("projective_cnn.md", "Reproduction: projective pruning of a CNN"),
    ("minilm.md", "The pretrained MiniLM pruned through the generic Pruner"),
    ("folding.md", "Reproduction: model folding"),
    ("cosep.md", "Reproduction: CoSeP"),
    ("equivariant.md", "Reproduction: equivariance-aware pruning"),
    ("cuda.md", "CUDA"),
]


def section(text: str) -> str:
    text = re.sub(r"^(#+) ", lambda m: "#" + m.group(1) + " ", text, flags=re.M)
    text = re.sub(r"\]\((?!http)([^)]+\.png)\)", r"](results/\1)", text)
    return text.replace("<!-- discussion: text below this line is kept when the script rewrites the file -->\n", "")


def main() -> int:
    parts = ["# Results\n",
             "Every number below was produced by the command quoted in its section, on the machine and "
             "date it names; ratios were measured side by side in one run. The per-topic files in "
             "`benchmarks/results/` (with JSON and plots) are the sources; this file is assembled from "
             "them by `benchmarks/make_results.py`.\n"]
    index = []
    for name, title in ORDER:
        path = HERE / "results" / name
        if not path.exists():
            continue
        index.append(f"- [{title}](results/{name})")
        body = section(path.read_text())
        parts.append(f"\n---\n\n<!-- from results/{name} -->\n" + body)
    parts.insert(2, "\n".join(index) + "\n")
    (HERE / "RESULTS.md").write_text("\n".join(parts))
    print(f"wrote {HERE / 'RESULTS.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
