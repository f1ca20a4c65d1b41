"""benchmarks/speed.py compares like with like, and reports the ratio it claims.

A speed ratio means something only if both sides do the same work: these tests check that one meta-step of every
lit_meta row and of learn2learn's MAML (FOMAML), from the same initialization on the same tasks, computes the same
meta-gradient; and that the printed ratio is learn2learn's time over ours. benchmarks/roofline.py's bound rests on its
FLOP count: checked against the arithmetic written out by hand, and equal for both libraries.
"""

from __future__ import annotations

import platform
import sys
from pathlib import Path
from tempfile import TemporaryDirectory

import pytest
import torch

from conftest import REPO, import_learn2learn

sys.path.insert(0, str(REPO / "benchmarks"))
import speed  # noqa: E402

SMALL = speed.Setting("small", ways=5, shots=1, queries=2, tasks=3, inner_steps=2, inner_lr=0.4)


def meta_gradient(method: speed.Method, batch) -> dict[str, torch.Tensor]:
    return speed.step_gradient(method, SMALL, batch, torch.device("cpu"))


@pytest.mark.parametrize("first_order", [False, True], ids=["maml", "fomaml"])
def test_every_row_computes_learn2learns_meta_gradient(first_order: bool) -> None:
    import_learn2learn()
    batch = speed.make_batch(SMALL, torch.device("cpu"))
    # Against learn2learn on the same norm kernel: the two kernels round differently, and on these tasks two inner
    # steps at alpha=0.4 amplify float32 rounding to ~5e-3 relative in the first layer (against a float64 run, the
    # native kernel drifts here and BatchStatNorm on other tasks). In float64 they agree to 1e-14, see
    # tests/test_optimization_algorithms.py::test_fused_norm_is_exact_where_it_is_allowed.
    references = {
        native: meta_gradient(speed.Method("l2l", "l2l", first_order=first_order, native_norm=native), batch)
        for native in (False, True)
    }
    ours = [m for m in speed.METHODS if m.library == "lit_meta" and m.first_order == first_order]
    assert ours, "no lit_meta row of this order"
    for method in ours:
        reference = references[method.native_norm]
        grads = meta_gradient(method, batch)
        assert grads.keys() == reference.keys()
        for name, g in grads.items():
            if name.startswith("features.") and name.endswith(".0.bias"):
                continue  # a conv bias feeding a batch-statistics norm has zero gradient: only rounding noise is left
            error = (g - reference[name]).norm() / reference[name].norm()
            assert error < 1e-4, f"{method.name}: {name} differs from learn2learn's by {error:.1e} (relative)"


def test_float64_check_finds_every_row_equal_to_learn2learn() -> None:
    """``--check`` (what a GPU run prints) compares in float64, where both norm kernels agree to rounding."""
    import_learn2learn()
    errors = speed.gradient_check(SMALL, torch.device("cpu"))
    assert set(errors) == {m.name for m in speed.METHODS if m.library == "lit_meta"}
    assert max(errors.values()) < 1e-10, errors
    assert torch.get_default_dtype() == torch.float32, "the check must restore the default dtype"


def test_the_ratio_is_learn2learns_time_over_ours() -> None:
    results = [
        speed.Result("5w1s", "ours MAML vmap", wall=[0.5, 0.4, 0.6], cpu=[1.0, 0.8, 1.2]),
        speed.Result("5w1s", "l2l MAML", wall=[2.0, 1.0, 3.0], cpu=[2.0, 2.0, 2.0]),
        speed.Result("5w1s", "ours FOMAML vmap", wall=[0.25], cpu=[0.5]),
        speed.Result("5w1s", "l2l FOMAML", wall=[0.5], cpu=[0.5]),
        speed.Result("5w1s", "ours FOMAML vmap native norm", wall=[0.1], cpu=[0.2]),
        speed.Result("5w1s", "l2l FOMAML native norm", wall=[0.3], cpu=[0.3]),
    ]
    rows = {line[13:43].strip(): line.split() for line in speed.table(results).splitlines()[2:]}
    assert rows["ours MAML vmap"][-2:] == ["4.00", "2.00"]  # medians: 2.0 / 0.5 wall, 2.0 / 1.0 cpu
    assert rows["ours FOMAML vmap"][-2:] == ["2.00", "1.00"]  # against the first-order baseline, not MAML's
    assert rows["ours FOMAML vmap native norm"][-2:] == ["3.00", "1.50"]  # against learn2learn on the same kernel


def test_quick_run_prints_every_method(capsys: pytest.CaptureFixture[str]) -> None:
    import_learn2learn()
    speed.main(["--quick", "--no-memory", "--threads", "1"])
    out = capsys.readouterr().out
    assert "malloc tuned" in out or platform.libc_ver()[0] != "glibc"  # the command line's allocator settings
    for setting in speed.settings(None, quick=True):
        for method in speed.METHODS:
            line = next((l for l in out.splitlines() if l.startswith(setting.name) and method.name in l), None)
            assert line is not None, f"no row for {setting.name} / {method.name}"
            fields = line.split()
            assert float(fields[len(method.name.split()) + 1]) > 0  # s/step


def test_end_to_end_steps_sample_fresh_episodes_from_each_library(omniglot_root: Path) -> None:
    import_learn2learn()
    setting = speed.Setting("e2e", ways=5, shots=1, queries=2, tasks=3, inner_steps=1, inner_lr=0.4)
    with TemporaryDirectory() as cache:
        sources = speed.end_to_end_sources(setting, omniglot_root, Path(cache), torch.device("cpu"))
        for library, source in sources.items():
            first, second = source(), source()
            assert first.support_x.shape == (3, 5, 1, 28, 28) and first.query_x.shape == (3, 10, 1, 28, 28), library
            assert first.support_x.dtype == torch.float32 and 0 <= first.support_x.min() and first.support_x.max() <= 1
            assert first.support_y.tolist() == [[0, 1, 2, 3, 4]] * 3, library
            assert first.query_y.tolist() == [[0, 0, 1, 1, 2, 2, 3, 3, 4, 4]] * 3, library
            assert not torch.equal(first.support_x, second.support_x), f"{library}: the same episodes twice"


def test_omniglot_init_from_loads_saved_weights_or_says_why_not(tmp_path: Path) -> None:
    """``benchmarks/omniglot.py --init-from`` continues from a saved model, and a wrong file is a one-line error."""
    import omniglot
    from lit_meta import MAML, Conv4

    def model(ways: int) -> MAML:
        return MAML(Conv4(1, hidden=8, out_features=ways, pool="stride", image_size=28, embedding="mean"), inner_lr=0.4)

    torch.manual_seed(0)
    trained = model(5)
    torch.save({"state_dict": trained.state_dict()}, tmp_path / "5way.ckpt")
    fresh = model(5)
    omniglot.init_from(fresh, tmp_path / "5way.ckpt")
    for (name, a), b in zip(trained.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), name

    with pytest.raises(SystemExit, match=r"size mismatch for backbone\.head\.weight.*use the method and ways"):
        omniglot.init_from(model(20), tmp_path / "5way.ckpt")
    with pytest.raises(SystemExit, match="no file"):
        omniglot.init_from(model(5), tmp_path / "missing.ckpt")
    torch.save({"weights": 1}, tmp_path / "other.ckpt")
    with pytest.raises(SystemExit, match="holds no 'state_dict'"):
        omniglot.init_from(model(5), tmp_path / "other.ckpt")


def test_profile_counts_one_vmapped_convolution_where_learn2learn_runs_one_per_task() -> None:
    import_learn2learn()
    import profile_step

    setting = speed.settings(None, quick=True)[0]
    ours, l2l = (profile_step.profile(m, setting, steps=1) for m in profile_step.METHODS)
    assert 0 < ours["conv_s"] <= ours["op_s"] and 0 < l2l["conv_s"] <= l2l["op_s"]
    assert l2l["conv_calls"] == setting.tasks * ours["conv_calls"]


def conv4_fomaml_gflop(setting: speed.Setting, hidden: int = 64, image: int = 28) -> float:
    """FOMAML's arithmetic on speed.py's Conv-4, written out: per image, a forward pass, the weight gradients of every
    layer and the input gradients of every layer but the first (the images need none), on the support set at each
    inner step and on the query set once."""
    convs, size, channels = [], image, 1
    for _ in range(4):
        size = (size + 1) // 2  # stride 2, padding 1
        convs.append(2 * size * size * hidden * channels * 9)
        channels = hidden
    head = 2 * hidden * setting.ways
    per_image = 3 * sum(convs) - convs[0] + 3 * head
    images = setting.ways * (setting.shots * setting.inner_steps + setting.queries)
    return setting.tasks * images * per_image / 1e9


def test_roofline_counts_the_arithmetic_both_libraries_do() -> None:
    import_learn2learn()
    import roofline

    setting = speed.settings(None, quick=True)[0]
    counted = {m.name: roofline.step_gflop(m, setting) for m in roofline.TIMED}
    assert counted["ours FOMAML vmap"] == pytest.approx(conv4_fomaml_gflop(setting), rel=1e-9)
    assert counted["l2l FOMAML"] == pytest.approx(counted["ours FOMAML vmap"], rel=1e-9)
    assert counted["l2l MAML"] == pytest.approx(counted["ours MAML vmap"], rel=1e-9)
    assert counted["ours MAML vmap"] > 1.5 * counted["ours FOMAML vmap"]  # the inner gradients' derivatives


def test_roofline_ceiling_is_learn2learns_time_at_the_peak() -> None:
    import roofline

    # 10 GFLOP per step at 20 GFLOP/s take at least 0.5 s: 4x learn2learn's 2 s at most; 3x needs 75% of the peak.
    assert roofline.ceiling(2.0, 10.0, 20.0) == pytest.approx(4.0)
    assert roofline.needed_share(3.0, 2.0, 10.0, 20.0) == pytest.approx(0.75)
    rows = [roofline.Row("s", "ours MAML vmap", 10.0, 1.0, 2.0, 8.0), roofline.Row("s", "l2l MAML", 10.0, 2.0, 2.0, 8.0)]
    ours, l2l = roofline.table(rows, peak=20.0, target=3.0).splitlines()[2:]
    # ... and at the convolutions' 8 GFLOP/s a step takes 1.25 s: 1.6x learn2learn at most.
    assert ours.split()[-8:] == ["10.00", "1.000", "10.0", "50%", "2.00", "4.00", "1.60", "75%"]
    assert l2l.split()[-4:] == ["10.00", "2.000", "5.0", "25%"]  # no ratios: it is the baseline
