"""The reproduction table: generated from the records, and every released checkpoint still reaches its number."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from conftest import REPO, cpu_trainer

sys.path.insert(0, str(REPO / "benchmarks"))
import reproduce  # noqa: E402

RECORDS = reproduce.load_records()
RELEASED = [
    (name, result)
    for name, entry in sorted(RECORDS.items())
    for result in entry.get("results") or []
    if (REPO / result["checkpoint"]).is_file()
]


def test_docs_reproduce_is_generated_from_the_records():
    """docs/reproduce.md is exactly what benchmarks/reproduce.py renders from the configs and the records (so the
    table cannot drift from them), and every config has an entry."""
    assert {p.name for p in reproduce.CONFIGS.glob("*.yaml")} <= set(RECORDS)
    assert (REPO / "docs" / "reproduce.md").read_text() == reproduce.render(RECORDS)


def test_every_result_names_its_protocol_and_a_committed_checkpoint():
    for name, entry in RECORDS.items():
        for key in ("paper", "published", "paper_protocol"):
            assert entry.get(key), f"{name}: {key} missing"
        assert entry.get("results") or entry.get("estimate"), f"{name}: neither a result nor what a run would take"
        for result in entry.get("results") or []:
            assert (REPO / result["checkpoint"]).is_file(), f"{name}: {result['checkpoint']} is not in the repository"
            assert result["steps"] == reproduce.schedule_steps(reproduce.read_config(name), entry), f"{name}: not the full schedule"


@pytest.mark.parametrize("name,result", RELEASED, ids=[f"{n}:{r['checkpoint'].rsplit('/', 1)[-1]}" for n, r in RELEASED])
def test_released_checkpoint_reproduces_its_number(name, result, request):
    """The first of the config's fixed test episodes, about 1,000 query predictions (``reproduce.check_episodes``),
    give the recorded value again (to a query or two out of a thousand: kernels may round differently on another
    CPU), well inside the table's confidence interval."""
    overrides = {k: result.get(k) for k in (*reproduce.MODEL_OVERRIDES, *reproduce.DATA_OVERRIDES)}
    config = reproduce.read_config(name)
    # Only the Omniglot rows need the full dataset (the sinusoid's tasks are generated).
    root = str(request.getfixturevalue("omniglot_root")) if "Omniglot" in config["data"]["class_path"] else None
    key = reproduce.check_key(result)
    n = int(key.removeprefix("first_"))
    _, _, metric, checked, first, _ = reproduce.evaluate(name, str(REPO / result["checkpoint"]), root, overrides, episodes=n)
    assert metric == result["metric"] and checked == n
    # A policy's return is a sum over 100 simulated steps: allow float rounding relative to its size.
    tolerance = 1e-4 * abs(result[key]) if metric.startswith("return_") else 0.002
    assert abs(first - result[key]) <= min(tolerance, result["ci"] / 2), (first, result[key])


def test_trainer_test_gives_the_same_number(omniglot_root):
    """``trainer.test`` (what ``python -m lit_meta test`` runs) and the table's evaluation agree on a released
    checkpoint, and adaptation does the work: before it the MAML head is at chance."""
    from datamodules import OmniglotDataModule
    from lit_meta import load_model

    name, result = next((n, r) for n, r in RELEASED if n == "omniglot_maml_5w1s.yaml")
    model = load_model(REPO / result["checkpoint"])
    data = dict(reproduce.read_config(name)["data"]["init_args"], root=omniglot_root, test_episodes=200)
    outcome = cpu_trainer().test(model, OmniglotDataModule(**data), verbose=False)[0]
    assert outcome["test/acc"] == pytest.approx(result["first_200"], abs=1e-6)
    assert outcome["test/acc_pre"] < 0.3  # chance is 0.2


def test_compare_prints_the_paired_difference(omniglot_root, capsys, tmp_path):
    """benchmarks/compare.py on one checkpoint under two protocols: each side's mean and the paired difference, which
    is exactly zero for a model against itself."""
    import compare

    name, result = next((n, r) for n, r in RELEASED if n == "omniglot_maml_5w1s.yaml")
    ckpt = str(REPO / result["checkpoint"])
    arguments = [f"configs/{name}", ckpt, ckpt, "--root", str(omniglot_root), "--episodes", "20"]
    compare.main(arguments)
    same = capsys.readouterr().out
    row = next(line for line in same.splitlines() if line.strip().startswith("acc |"))
    assert row.split("|")[3].split() == ["0.000", "±", "0.000"], same
    compare.main([*arguments, "--b", "normalization=support", "--save", str(tmp_path)])
    other = capsys.readouterr().out
    cells = next(line for line in other.splitlines() if line.strip().startswith("acc |")).split("|")
    assert float(cells[1].split()[0]) - float(cells[2].split()[0]) == pytest.approx(float(cells[3].split()[0]), abs=2e-3)

    # Saved per-episode values stand in for their checkpoint: the same table without evaluating either model again.
    stem = f"{Path(name).stem}.{Path(ckpt).parent.name}-{Path(ckpt).stem}"
    saved_a, saved_b = tmp_path / f"{stem}.episodes.pt", tmp_path / f"{stem}.normalization-support.episodes.pt"
    compare.main([f"configs/{name}", str(saved_a), str(saved_b)])
    assert capsys.readouterr().out.splitlines()[1:] == other.splitlines()[3:]
    with pytest.raises(SystemExit, match="test episodes"):
        compare.main(["configs/omniglot_protonet_5w1s.yaml", str(saved_a), str(saved_b)])


def test_saved_values_record_only_their_own_checkpoint(tmp_path):
    """``reproduce.py evaluate --values`` takes per-episode values saved by compare.py: it gives the full evaluation's
    numbers, and refuses a file that holds another checkpoint's values or only some of the test episodes."""
    import compare

    name = "sinusoid_maml.yaml"
    maml = str(REPO / "benchmarks/results/maml-sinusoid/step70000.ckpt")
    pretrained = str(REPO / "benchmarks/results/sinusoid-pretrained/step70000.ckpt")
    compare.main([f"configs/{name}", maml, pretrained, "--save", str(tmp_path)])
    saved_pretrained = tmp_path / "sinusoid_maml.sinusoid-pretrained-step70000.episodes.pt"
    direct = reproduce.evaluate(name, pretrained, None, {})
    from_file = reproduce.evaluate(name, pretrained, None, {}, values_file=str(saved_pretrained))
    assert from_file[:5] == pytest.approx(direct[:5])
    assert {k: pytest.approx(v) for k, v in from_file[5].items()} == direct[5]
    with pytest.raises(SystemExit, match="does not hold"):
        reproduce.evaluate(name, maml, None, {}, values_file=str(saved_pretrained))
    compare.main([f"configs/{name}", maml, maml, "--episodes", "10", "--save", str(tmp_path / "part")])
    with pytest.raises(SystemExit, match="holds 10 episodes"):
        reproduce.evaluate(name, maml, None, {}, values_file=str(next((tmp_path / "part").glob("*.pt"))))


def test_release_drops_only_the_optimizer_state(tmp_path):
    """A released checkpoint is smaller, has no optimizer state, and evaluates to exactly the original's values."""
    import torch

    source = REPO / "benchmarks/results/maml-sinusoid/step70000.ckpt"
    original = torch.load(source, map_location="cpu", weights_only=False)
    assert original["optimizer_states"], "the source must still hold its optimizer state for this test to mean anything"
    target = reproduce.release(source, tmp_path)
    released = torch.load(target, map_location="cpu", weights_only=False)
    assert target.name == source.name and target.stat().st_size < source.stat().st_size
    assert released["optimizer_states"] == [] and released.keys() == original.keys()
    assert all(torch.equal(released["state_dict"][k], v) for k, v in original["state_dict"].items())
    name = "sinusoid_maml.yaml"
    assert reproduce.evaluate(name, str(target), None, {}, episodes=20) == reproduce.evaluate(name, str(source), None, {}, episodes=20)
