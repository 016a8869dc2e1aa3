"""The README tells the truth: its figures come from committed results files, its
snippets run as pasted, and its test command is the one CI runs (issue 10, 15/18/19)."""

import json
import os
import re

import pytest

from conftest import REPO, run_python

README = open(os.path.join(REPO, "README.md")).read()


def _section(title):
    start = README.index(title)
    return README[start:README.index("\n## ", start + 1)]


ROW = re.compile(r"^\| (\w[\w.]*) \| (\d+) \| \**([\d.e-]+)\** \| (\w+) ([\d.e-]+)")


def test_the_results_tables_match_their_results_files():
    """Each table row (suite | k | model | best learner) matches the results file named last
    above it in the Results section."""
    source, checked, files = None, 0, set()
    for line in _section("## Results").splitlines():
        named = re.findall(r"docs/results/([\w.-]+_eval\.json)", line)
        if named:
            source = named[-1]
        row = ROW.match(line)
        if not row:
            continue
        assert source, f"table row before any results file: {line}"
        with open(os.path.join(REPO, "docs", "results", source)) as f:
            m_all = json.load(f)["suites"]
        suite, k, model, best_name, best = row.groups()
        m = m_all[suite]["methods"]
        assert float(model) == pytest.approx(m["model"][k]["nmse"], rel=6e-3), (source, suite, k)
        assert float(best) == pytest.approx(m[best_name.lower()][k]["nmse"], rel=2e-2)
        others = [v[k]["nmse"] for n, v in m.items() if n not in ("model", "bayes_optimal")]
        assert float(best) == pytest.approx(min(others), rel=2e-2), (source, suite, k)
        checked += 1
        files.add(source)
    assert checked >= 12 and len(files) >= 2, (checked, files)


def test_the_classification_transfer_tables_match_their_results_files():
    """Rows `| method | iris | wine | breast_cancer | digits_test |` (accuracy in % at 10 per
    class) match the transfer results file named last above them."""
    source, header, checked = None, None, 0
    for line in _section("## Results").splitlines():
        named = re.findall(r"docs/results/([\w.-]+transfer_eval[\w.-]*\.json)", line)
        if named:
            source = named[-1]
        if line.startswith("| method |"):
            header = [c.strip() for c in line.strip("|").split("|")][1:]
            continue
        row = re.match(r"^\| (model\w*|sgd|logreg|knn|random_forest|gbt) \| (.*) \|$", line)
        if not row or "digits_test" not in (header or []):
            continue
        with open(os.path.join(REPO, "docs", "results", source)) as f:
            data = json.load(f)["datasets"]
        values = [float(v.strip("* ")) for v in row.group(2).split("|")]
        want = [100 * data[d]["methods"][row.group(1)]["10"]["accuracy"] for d in header]
        assert values == pytest.approx(want, abs=0.051), (source, line)
        checked += 1
    assert checked >= 13, checked


def test_every_results_file_named_in_the_readme_exists_with_its_command():
    named = set(re.findall(r"docs/results/([\w.-]+\.json)", README))
    listing = open(os.path.join(REPO, "docs", "results", "README.md")).read()
    assert named
    for name in named:
        assert os.path.exists(os.path.join(REPO, "docs", "results", name)), name
        assert f"`{name}`" in listing  # with the command that made it


def test_the_readme_test_command_is_what_ci_runs():
    ci = open(os.path.join(REPO, ".ci", "run")).read()
    block = re.search(r'pip install -e "\.\[test\]" && (python -m pytest[^\n`]*)', README)
    assert block and block.group(1).strip() in ci.splitlines()


def test_the_estimator_snippet_runs_as_pasted(tiny_export_d8, tmp_path):
    code = re.search(r"```python\n(import numpy as np\nfrom sklearn.*?)```", README, re.S).group(1)
    os.makedirs(tmp_path / "exports")
    os.symlink(tiny_export_d8, tmp_path / "exports" / "gpicl")  # the main job's widths: 1 to 8
    out = run_python(code + "\nprint('SNIPPET_OK', reg.predict(X_test).shape)", cwd=str(tmp_path))
    assert "SNIPPET_OK (20,)" in out.stdout


def test_the_distribution_snippet_runs_as_pasted(tmp_path):
    """The bar head's snippet, run after the estimator snippet, on a tiny export of the
    default's kind (widths 1 to 8, the bar head)."""
    import keras

    from gpicl_tf.config import apply_overrides, get_preset
    from gpicl_tf.export import export_model
    from gpicl_tf.model import build_model

    first = re.search(r"```python\n(import numpy as np\nfrom sklearn.*?)```", README, re.S).group(1)
    code = re.search(r"```python\n(reg = InContextRegressor\(\"exports/gpicl\"\)\.fit.*?)```",
                     README, re.S).group(1)
    cfg = apply_overrides(get_preset("tiny"), ["task.x_dim=8", "task.min_x_dim=1",
                                               "model.absent_features=flags",
                                               "model.head=bar", "model.n_bins=16"])
    keras.utils.set_random_seed(0)
    export_model(build_model(cfg), cfg, str(tmp_path / "exports"), "gpicl")
    out = run_python(first + code + "\nprint('SNIPPET_OK', std.shape, lo.shape, q90.shape, "
                     "bool((lo <= mid).all() and (mid <= hi).all()))", cwd=str(tmp_path))
    assert "SNIPPET_OK (20,) (20,) (20,) True" in out.stdout


def test_the_distribution_table_matches_its_results_file():
    """Rows `| suite | k | model NLL | GP NLL | exact NLL | model cover90 | GP cover90 |`."""
    section = _section("## Results")
    start = section.index("| suite | k | model NLL |")
    rows = [r for r in section[start:].split("\n\n")[0].splitlines()[2:]]
    with open(os.path.join(REPO, "docs", "results", "default_1d_eval.json")) as f:
        suites = json.load(f)["suites"]
    assert len(rows) >= 5
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        m = suites[cells[0]]["methods"]
        k = cells[1]
        assert float(cells[2]) == pytest.approx(m["model"][k]["nll"], rel=6e-3, abs=1e-3)
        assert float(cells[3]) == pytest.approx(m["gp"][k]["nll"], rel=6e-3, abs=1e-3)
        if cells[4]:
            assert float(cells[4]) == pytest.approx(m["bayes_optimal"][k]["nll"], rel=6e-3)
        assert float(cells[5]) == pytest.approx(m["model"][k]["cover90"], abs=1e-3)
        assert float(cells[6]) == pytest.approx(m["gp"][k]["cover90"], abs=1e-3)


def test_the_real_data_table_matches_its_results_file():
    """Rows `| task (R^2 or accuracy) | rows | shipped model [(subsets s)] | baselines... |` of
    the README equal benchmarks/real_data.py's docs/results/real_data.json."""
    with open(os.path.join(REPO, "docs", "results", "real_data.json")) as f:
        results = json.load(f)
    row = re.compile(r"^\| (\w+) \((R\^2|accuracy)\) \| (\d+(?: width=\d+)?) \| ([-\d.]+)"
                     r"(?: \(subsets ([-\d.]+)\))? \| (.*) \|$")
    reg_names = ("gpicl_x4", "gpicl_nobase", "ridge", "gp", "gp_ard", "gbt", "random_forest", "knn")
    checked = 0
    for line in _section("## Results").splitlines():
        m = row.match(line)
        if not m:
            continue
        name, metric, rows, model, subsets, rest = m.groups()
        key = f"{name} n={rows}"
        if metric == "R^2":
            cell = results["regression"][key]
            names = reg_names
        else:
            cell = results["classification"][key]["accuracy"]
            names = ("gpicl_x8", "logreg", "knn", "random_forest", "gbt")
        assert float(model) == pytest.approx(cell["gpicl"]["mean"], abs=6e-4), key
        if subsets:
            assert float(subsets) == pytest.approx(cell["gpicl_subsets"]["mean"], abs=6e-4)
        values = [float(v) for v in rest.split(" | ")]
        assert values == pytest.approx([cell[b]["mean"] for b in names], abs=6e-4), key
        checked += 1
    assert checked >= 10, checked
