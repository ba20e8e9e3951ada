"""The README's library tour runs exactly as written."""
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
DOCS = README.parent / "docs"
RESULTS = README.parent / "results"


def test_library_tour_runs_as_written(capsys):
    text = README.read_text()
    tour = text[text.index("## Library tour"):]
    code = re.search(r"```python\n(.*?)```", tour, re.S).group(1)
    assert len(code.strip().splitlines()) <= 15
    exec(compile(code, "README.md", "exec"), {})
    assert capsys.readouterr().out.strip() == "torch.Size([5, 2])"


def test_quick_start_is_two_make_commands():
    text = README.read_text()
    quick = text[text.index("## Quick start"):text.index("## Library tour")]
    block = re.search(r"```bash\n(.*?)```", quick, re.S).group(1)
    commands = [line.split("#")[0].strip() for line in block.splitlines() if line.split("#")[0].strip()]
    assert commands == ["make demo", "make test"]
    makefile = (README.parent / "Makefile").read_text()
    assert "torch==2.13.0" in makefile
    assert "make test" in (README.parent / ".ci" / "run").read_text()


def test_own_data_commands_run_as_written(tmp_path, monkeypatch, capsys):
    """From a fresh clone: `make install` (a real Makefile target), then every `.venv/bin/metavae`
    line exactly as written (epochs and adapt steps shortened), on a table and files made here."""
    import shlex

    import numpy as np
    import pandas as pd

    from metavae.cli import main

    text = README.read_text()
    section = text[text.index("## Your own family of data sets"):text.index("## Command line")]
    commands = [line for line in re.search(r"```bash\n(.*?)```", section, re.S).group(1).splitlines() if line.strip()]
    assert commands[0] == "make install" and "\ninstall: $(STAMP)" in (README.parent / "Makefile").read_text()
    assert "pip install -e '.[data]'" in section and 'data = ["pandas' in (README.parent / "pyproject.toml").read_text()
    commands = commands[1:]
    assert all(c.startswith(".venv/bin/metavae ") for c in commands)
    assert [c.split()[1] for c in commands] == ["train", "embed", "evaluate", "embed", "train", "sample", "adapt",
                                                "sample"]
    rng = np.random.default_rng(0)
    monkeypatch.chdir(tmp_path)

    def table(sites, n=120):
        frames = []
        for site in sites:
            label = rng.integers(0, 2, n)
            x = 3 * rng.normal(size=3) + 2.0 * label[:, None] + rng.normal(size=(n, 3))
            frames.append(pd.DataFrame({"site": site, "label": label, "x1": x[:, 0] * 1000 + 5000, "x2": x[:, 1],
                                        "x3": x[:, 2]}))
        return pd.concat(frames)

    table([f"site{k}" for k in range(4)]).to_csv("family.csv", index=False)
    table(["new1", "new2"]).to_csv("unseen.csv", index=False)
    unseen = table(["new"], 80)[["x1", "x2", "x3"]].to_numpy()  # float64 on purpose
    np.save("new-points.npy", unseen[:10])
    np.save("new-context.npy", unseen[10:])
    for command in commands:
        argv = shlex.split(command)[1:]
        if argv[0] == "train":  # as written, but shorter and quiet
            argv += ["--set", "epochs=2", "--quiet"]
        if argv[0] in ("adapt", "evaluate"):
            argv += ["--quiet"] + (["--steps", "50"] if argv[0] == "adapt" else [])
        assert main(argv) == 0, command
    out = capsys.readouterr()
    assert "float64 data cast to float32" in out.err and "likelihood=gaussian" in out.err
    assert out.out.count("On linear-probe accuracy the embedding") == 1
    assert np.load("z.npy").shape == (10, 4) and pd.read_csv("samples.csv").shape == (64, 3)
    assert list(pd.read_csv("z.csv").columns) == ["site", "label", "z_0", "z_1", "z_2", "z_3"]
    assert np.load("new-samples.npy").shape == (64, 3)
    assert abs(np.load("new-samples.npy")[:, 0].mean() - unseen[:, 0].mean()) < 3 * unseen[:, 0].std()
    for name in ("model.pt", "metrics.json", "metrics.jsonl", "loss.png"):
        assert (tmp_path / "my-run" / name).exists(), name
    assert (tmp_path / "my-eval" / "report.md").exists()


def _same_report_files(committed: Path, rebuilt: Path, names) -> None:
    for name in names:
        assert (committed / name).read_text().strip() == (rebuilt / name).read_text().strip(), name


def test_mnist_results_pages_are_what_the_report_rebuilds_from_results(tmp_path):
    """results/mnist-report (pasted into the site by docs/hooks/generated.py) is exactly what
    `metavae report mnist --runs results/mnist` rebuilds from the committed metrics.json files:
    no number in it is typed by hand."""
    from metavae.cli import main

    assert main(["report", "mnist", "--runs", str(RESULTS / "mnist"), "--out", str(tmp_path)]) == 0
    _same_report_files(RESULTS / "mnist-report", tmp_path, ("table2.md", "table1.md", "report.md", "regimes.md"))
    assert (tmp_path / "table2.md").read_text().count("\n| rotate |") >= 4  # trained models and both controls
    page = (DOCS / "experiments" / "mnist.md").read_text()
    assert "<!-- results: results/mnist-report/table2.md -->" in page and "| rotate |" not in page  # pasted, not typed


def test_norb_results_pages_are_what_the_report_rebuilds_from_results(tmp_path):
    from metavae.cli import main

    assert main(["report", "norb", "--runs", str(RESULTS / "norb"), "--out", str(tmp_path)]) == 0
    _same_report_files(RESULTS / "norb-report", tmp_path, ("table2.md", "table1.md"))
    block = (tmp_path / "table2.md").read_text()
    assert block.count("| 5 ep,") >= 12  # every axis and model has a finished run
    table1 = (tmp_path / "table1.md").read_text().strip()
    assert " - " not in table1 and table1.count(" / ") == 9  # every row measured, each beside its untrained control


def test_layout_names_every_module():
    layout = (DOCS / "layout.md").read_text()
    src = README.parent / "src" / "metavae"
    missing = [str(p.relative_to(src)) for p in src.rglob("*.py") if p.name != "__init__.py" and p.name not in layout]
    assert not missing, f"docs/layout.md does not name: {missing}"


def _block(name: str) -> str:
    """A generated block (between <!-- name --> markers) wherever it is in the README or the docs."""
    pages = [p for p in sorted(DOCS.rglob("*.md")) if "templates" not in p.relative_to(DOCS).parts]
    text = "\n".join(p.read_text() for p in [README, *pages] if f"<!-- {name} -->" in p.read_text())
    return text[text.index(f"<!-- {name} -->") + len(f"<!-- {name} -->"):text.index(f"<!-- /{name} -->")].strip()


def test_readme_generation_and_pooling_tables_are_rebuilt_from_results():
    import json

    from metavae.paper.generation import likelihood_table
    from metavae.paper.mog import pooling_table

    results = README.parent / "results"
    assert _block("generation-table") == likelihood_table(
        json.loads((results / "generation" / "metrics.json").read_text())).strip()
    assert _block("pooling-table") == pooling_table(results / "pooling").strip()
    from metavae.paper.mnist import pooling_table as mnist_pooling_table

    assert _block("pooling-mnist-table") == mnist_pooling_table(results / "pooling-mnist").strip()
    from metavae.paper.mnist_gap import gap_table

    gap = json.loads((results / "mnist-gap" / "rotate-interleaved-full" / "metrics.json").read_text())
    assert _block("mnist-gap-table") == gap_table(gap).strip()


def test_results_pages_are_what_their_templates_render(tmp_path):
    """Every page under docs/ that has a template is exactly what `metavae report pages` writes
    from results/: no number in it was typed by hand or has drifted from its file."""
    from metavae.paper.pages import write_pages

    templates = DOCS / "templates"
    written = write_pages(templates, tmp_path, RESULTS)
    assert len(written) >= 3
    for page in written:
        committed = DOCS / page.relative_to(tmp_path)
        assert committed.read_text() == page.read_text(), f"{committed} differs: run `metavae report pages`"


def test_a_page_placeholder_that_fails_names_itself(tmp_path):
    from metavae.paper.pages import render

    (tmp_path / "m.json").write_text('{"a": {"b": 0.5}}')
    assert render("x {{ let v = R('m.json')['a']['b'] }}{{ 100 * v | .1f }}%", tmp_path) == "x 50.0%"
    with pytest.raises(ValueError, match="placeholder .*R\\('m.json'\\)\\['c'\\].* KeyError"):
        render("{{ R('m.json')['c'] }}", tmp_path)


def test_page_helpers_span_sig_and_paper_constants(tmp_path):
    from metavae.paper.pages import render, sig, span

    assert span([0.0731, 0.052, 0.06], ".2f") == "0.05-0.07" and span([0.131, 0.129], ".2f") == "0.13"
    assert sig(3.1e-05) == "3.1e-5" and sig(53263.5) == "5.3e4" and sig(1e-17, zero=1e-15) == "~0"
    assert render("{{ PAPER('mnist-table2')['rotate']['metavae'] }} {{ span([1, 3], 'd') }}", tmp_path) == "0.885 1-3"


def test_report_templates_ship_and_each_is_used():
    """The experiments' report prose lives in metavae/paper/templates (package data); every template
    there is rendered by name."""
    paper = README.parent / "src" / "metavae" / "paper"
    assert '"metavae.paper" = ["templates/*.md"]' in (README.parent / "pyproject.toml").read_text()
    code = "\n".join(p.read_text() for p in paper.glob("*.py"))
    unused = [t.stem for t in (paper / "templates").glob("*.md") if f'"{t.stem}"' not in code]
    assert not unused, unused


def test_experiment_reports_rebuild_from_committed_results():
    """Each experiment's report.md renders from its committed metrics.json alone (its config read
    back, old setting names included), with every placeholder filled."""
    import json

    from metavae.paper import expfam, gap, generation, mnist_gap, mog, physics
    from metavae.settings import config_from_dict

    def load(name):
        return json.loads((RESULTS / name / "metrics.json").read_text())

    m = {name: load(name) for name in ("gap", "physics", "expfam-single", "expfam-many", "mog", "generation")}
    many = m["expfam-many"]
    texts = [gap._report(m["gap"], config_from_dict(gap.GapConfig, m["gap"]["config"])),
             physics._report(m["physics"]),
             expfam._report_single(m["expfam-single"],
                                   config_from_dict(expfam.ExpfamConfig, m["expfam-single"]["config"])),
             expfam._report_many(many, config_from_dict(expfam.ExpfamConfig, many["config"]), list(many["mse"]),
                                 list(many["sweep"])),
             mog._report(m["mog"], config_from_dict(mog.MogConfig, m["mog"]["config"])),
             generation.report(m["generation"]),
             mnist_gap.report(load("mnist-gap/rotate-interleaved-full"))]
    for text in texts:  # no placeholder ({name}, {m[key]:.3f}) left unfilled
        assert text.startswith("# ") and not re.search(r"\{[A-Za-z_][\w.\[\]]*(:[^}]*)?\}", text), text[:80]


def test_readme_verdict_on_context_is_what_the_committed_regime_map_says():
    """The README's section on whether conditioning on D helps is typed prose; each of its claims is
    checked here against results/mnist-report/regimes.json (rebuilt from results/ by the report,
    test above), so a result that contradicts a sentence fails until the sentence is rewritten."""
    import json

    text = README.read_text()
    section = text[text.index("## Does conditioning on a context set help?"):text.index("## Results and documentation")]
    rj = json.loads((README.parent / "results" / "mnist-report" / "regimes.json").read_text())

    def word(at, model, other):
        return _verdict(rj["verdict"], at, model, other)

    assert "Not in the range measured so far" in section
    from metavae.paper.mnist import PRESETS
    from metavae.paper.regimes import MARGIN

    # the section's typed settings: the margin, the pool, the test context sizes
    assert "the 0.01 margin" in section and MARGIN == 0.01
    assert "a pool of 50" in section and PRESETS["long"].context_pool == 50
    assert "(N = 1 to 50)" in section and {int(n) for n in rj["n"]["vhe"]} == {1, 2, 5, 10, 50}
    assert rj["context_vs_no_context"] and all(c["verdict"] != "higher" for c in rj["context_vs_no_context"])
    assert word("K=10, N=10", "metavae", "vae") == "lower" and word("K=10, N=10", "vhe", "vae") == "lower"
    assert word("K=10, N=10", "metavae", "metavae-nocontext") == "level"
    assert word("K=10, N=10", "vhe", "metavae-nocontext") == "lower"
    for model in ("metavae", "vhe"):
        assert word("K=10, N=10", model, "random-projection") == "higher"
        assert word("K=10, N=10", model, "pixels") == "lower"
    k = {int(key): v["standardised"]["mean"] for key, v in rj["k"]["metavae"].items()}
    assert {1, 2, 5, 10} <= set(k) and max(k.values()) - min(k.values()) < 0.01  # "move the MetaVAE little"
    assert word("K=1", "metavae", "vhe") == "higher"
    assert all(rj["k"][m][str(n)]["standardised"]["n"] == 2 for m in ("metavae", "vhe") for n in (1, 2, 5))
    assert all(rj["k"][m]["10"]["standardised"]["n"] == 3 for m in ("metavae", "vhe"))
    assert all(word(f"K={n}", "metavae", "vhe") == "level" for n in (2, 5, 10))
    vs_vae = {(c["model"], c["K"]): c for c in rj["context_vs_no_context"] if c["control"] == "vae"}
    assert vs_vae["metavae", 1]["verdict"] == "level"
    assert all(vs_vae["metavae", k]["verdict"] == "lower" for k in (2, 5, 10))
    assert all(vs_vae["vhe", k]["verdict"] == "lower" for k in (1, 2, 5, 10))
    assert vs_vae["metavae", 1]["no_context"]["n"] == 2 and vs_vae["metavae", 1]["context"]["n"] == 2
    assert all(vs_vae["metavae", k]["no_context"]["n"] == 1 for k in (2, 5))
    assert all(rj["pooling"][m]["verdict"] == "level" and rj["pooling"][m]["unpooled"]["n"] == 1 for m in ("metavae", "vhe"))
    vae = next(c["no_context"]["mean"] for c in rj["context_vs_no_context"] if c["control"] == "vae" and c["K"] == 10)
    for model in ("metavae", "vhe"):  # "help the MetaVAE and the VHE a little, neither up to the VAE"
        n = {int(key): v["standardised"]["mean"] for key, v in rj["n"][model].items()}
        assert n[50] > n[1] and max(n.values()) < vae
    runs = README.parent / "results" / "mnist" / "mnist-rotate" / "contiguous"
    seeds = {m: [json.loads(p.read_text())["mean_unseen_accuracy"]["standardised"] for p in (runs / m).glob("seed-*/metrics.json")]
             for m in ("metavae", "metavae-nocontext")}
    assert max(seeds["metavae"]) < min(seeds["metavae-nocontext"])  # "though above it in every seed"


def _verdict(lines: list, at: str, model: str, other: str) -> str:
    """The bold word of the generated verdict line '- AT: MODEL ... against OTHER ...: **word**.'"""
    for line in lines:
        head, _, rest = line[2:].partition(": ")
        if head == at and rest.startswith(f"{model} ") and f" against {other} " in rest:
            return rest.rsplit("**", 2)[1]
    raise AssertionError(f"no verdict line for {at}: {model} against {other}")
