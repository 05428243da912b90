"""``ldb-bench``: its arithmetic, its Stochastic Depth peer, its command line, and tiny end-to-end runs.

No test asserts anything about timing: figures measured on a shared machine are the report's business.
"""

import json

import pytest
import torch
from torchvision.models import resnet18

from lightning_ldb.bench import cli, report
from lightning_ldb.bench.runner import VARIANTS, BenchConfig, run_benchmark, run_variant
from lightning_ldb.bench.workloads import WORKLOADS, add_stochastic_depth

TINY = {"model": "digits_cnn", "epochs": 3, "train_samples": 48, "val_samples": 16, "batch_size": 16, "repeats": 1}


def _run(variant, repeat, seconds, modes=None, acc=0.5):
    modes = modes or ["full"] * len(seconds)
    epochs = [
        {"epoch": e, "seconds": s, "mode": m, "steps": 2 if m == "drop" else 4, "val_acc": acc}
        for e, (s, m) in enumerate(zip(seconds, modes))
    ]
    return {"variant": variant, "repeat": repeat, "epochs": epochs}


# ---------------------------------------------------------------------------------------------- arithmetic
def test_speedup_and_spread_by_hand():
    assert report.speedup(75.0, 100.0) == 0.25
    assert report.speedup(120.0, 100.0) == -0.2
    with pytest.raises(ValueError, match="baseline_seconds"):
        report.speedup(1.0, 0.0)
    assert report.spread([2.0, 4.0, 9.0]) == {"mean": 5.0, "min": 2.0, "max": 9.0, "n": 3}
    assert report.spread([]) is None


def test_drop_to_full_ratio_leaves_out_warm_up_and_needs_both_modes():
    epochs = _run("ldb", 0, [10.0, 4.0, 2.0, 4.0, 3.0], ["full", "full", "drop", "full", "drop"])["epochs"]
    assert report.drop_to_full_ratio(epochs, skip_epochs=1) == pytest.approx(2.5 / 4.0)
    assert report.drop_to_full_ratio(epochs, skip_epochs=0) == pytest.approx(2.5 / 6.0)
    assert report.drop_to_full_ratio(epochs[:2], skip_epochs=0) is None


def test_each_run_is_compared_with_the_baseline_of_its_own_repetition():
    modes = ["full", "full", "drop"]
    result = {
        "config": {"skip_epochs": 1},
        "runs": [
            _run("baseline", 0, [1.0, 1.0, 2.0]),  # 4 s
            _run("ldb", 0, [1.0, 1.0, 1.0], modes, acc=0.7),  # 3 s: +25%
            _run("ldb", 1, [2.0, 2.0, 2.0], modes, acc=0.9),  # 6 s against 8 s: +25%, not -50%
            _run("baseline", 1, [2.0, 2.0, 4.0]),
        ],
    }
    rows = {row["variant"]: row for row in report.summarize(result)}
    assert list(rows) == ["baseline", "ldb"]
    assert rows["ldb"]["speedup"] == {"mean": 0.25, "min": 0.25, "max": 0.25, "n": 2}
    assert rows["ldb"]["seconds"]["min"] == 3.0 and rows["ldb"]["seconds"]["max"] == 6.0
    assert rows["ldb"]["drop_to_full"]["mean"] == 1.0
    assert rows["ldb"]["steps"]["mean"] == 10.0
    assert rows["ldb"]["final_acc"]["mean"] == pytest.approx(0.8)
    assert rows["baseline"]["drop_to_full"] is None
    table = report.markdown_table(report.summarize(result))
    assert "| ldb | 4.50 (3.00 to 6.00) | 1.00 | 10 | 0.800 (0.700 to 0.900) | +25.0% |" in table
    assert "| baseline | 6.00 (4.00 to 8.00) | – |" in table


def test_attribution_separates_the_schedule_from_the_dropping():
    rows = [
        {"variant": "ldb", "speedup": report.spread([0.30]), "drop_to_full": report.spread([0.6])},
        {"variant": "batch-only", "speedup": report.spread([0.20]), "drop_to_full": report.spread([0.9])},
    ]
    epochs, whole = report.attribution_lines(rows)
    assert "0.60x a full epoch" in epochs and "0.90x with batch-only" in epochs
    assert "+30.0%" in whole and "+20.0%" in whole and "adds +10.0%" in whole
    assert report.attribution_lines(rows[:1]) == []


def test_variants_change_only_what_they_measure():
    config = BenchConfig()
    ldb = config.callback_args("ldb")
    assert config.callback_args("baseline") is None and config.callback_args("stochastic-depth") is None
    assert config.callback_args("batch-only") == {**ldb, "drop_rate": 0.0}
    assert config.callback_args("drop-only") == {**ldb, "batch_scale": 1}
    assert config.callback_args("ldb-block") == {**ldb, "backward": "block"}
    assert ldb["lr_scale"] == 2.0 and ldb["batch_scale"] == 2 and ldb["drop_rate"] == 0.3


# ---------------------------------------------------------------------------------------------- stochastic depth
def test_stochastic_depth_skips_identity_blocks_forward_and_backward_and_uses_its_own_generator():
    net = resnet18(num_classes=3)
    assert add_stochastic_depth(net, final_rate=0.0, seed=0) == 5
    net = resnet18(num_classes=3)
    add_stochastic_depth(net, final_rate=0.999, seed=0)
    last = net.layer4[1]  # identity shortcut, the last block: rate 0.999
    x = torch.rand(2, 512, 2, 2)
    state = torch.get_rng_state()
    net.train()
    assert torch.equal(last(x), x)  # branch skipped
    assert torch.equal(torch.get_rng_state(), state)  # draws do not touch the global RNG
    net(torch.rand(2, 3, 32, 32)).sum().backward()
    assert last.conv1.weight.grad is None  # skipped in backward too
    assert net.layer4[0].conv1.weight.grad is not None  # the projecting block always runs
    net.eval()
    assert not torch.equal(last(x), x)  # evaluation runs every block


def test_stochastic_depth_rejects_networks_without_identity_blocks():
    with pytest.raises(ValueError, match="identity shortcuts"):
        add_stochastic_depth(torch.nn.Sequential(torch.nn.Linear(2, 2)), 0.5, seed=0)
    with pytest.raises(ValueError, match="final_rate"):
        add_stochastic_depth(resnet18(), 1.0, seed=0)


# ---------------------------------------------------------------------------------------------- command line
def test_help_gives_every_option_a_description_and_one_default(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    parser = cli.build_parser()
    for action in parser._actions:
        assert action.help, action.option_strings
    assert "default: None" not in text
    for action in parser._actions:
        if action.option_strings and action.option_strings[0] not in ("-h", "--quick"):
            assert action.help.count("default") <= 1, action.option_strings


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--epochs", "0"], "argument --epochs: expected an integer in [1, inf), got '0'"),
        (["--drop-rate", "1.5"], "argument --drop-rate: expected a number in [0, 1), got '1.5'"),
        (["--lr", "0"], "argument --lr: expected a number in (0, inf), got '0'"),
        (["--variants", "ldb,nope"], "argument --variants: expected distinct names among baseline"),
        (["--model", "digits_cnn", "--image-size", "32"], "argument --image-size: digits_cnn trains on digits"),
        (["--model", "digits_cnn", "--variants", "stochastic-depth"], "stochastic-depth needs a ResNet"),
        (["--epochs", "2"], "argument --every: 2 leaves no DROP epoch in 2 epochs"),
        (["--epochs", "3", "--skip-epochs", "3"], "argument --skip-epochs: must be below --epochs (3), got 3"),
        (["--quick", "--suite", "gpu"], "argument --quick: not allowed with --suite"),
    ],
)
def test_bad_arguments_end_in_one_line_naming_the_argument(argv, expected, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err


def test_quick_preset_and_explicit_flags():
    parser = cli.build_parser()
    quick = cli.resolve(parser.parse_args(["--quick"]), cli.QUICK, parser)
    assert (quick.model, quick.epochs, quick.repeats, quick.threads) == ("digits_cnn", 4, 2, 1)
    assert quick.batch_size == WORKLOADS["digits_cnn"].batch_size
    assert {"baseline", "ldb", "batch-only", "drop-only"} <= set(quick.variants)
    assert "ldb-block" not in quick.variants and "stochastic-depth" not in quick.variants  # no residual branches
    assert cli.resolve(parser.parse_args(["--quick", "--epochs", "6"]), cli.QUICK, parser).epochs == 6
    resnet = cli.resolve(parser.parse_args([]), {}, parser)
    assert resnet.model == "resnet18" and {"stochastic-depth", "ldb-block"} <= set(resnet.variants)


# ---------------------------------------------------------------------------------------------- end to end
def test_every_variant_trains_with_its_schedule_and_the_report_is_written(tmp_path, capsys):
    argv = [f"--{k.replace('_', '-')}={v}" for k, v in TINY.items()]
    variants = "baseline,ldb,batch-only,drop-only"
    assert cli.main([*argv, "--variants", variants, "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "report.json").read_text())
    runs = {run["variant"]: run["epochs"] for run in result["runs"]}
    steps = {name: [e["steps"] for e in epochs] for name, epochs in runs.items()}
    assert steps["baseline"] == [3, 3, 3] and steps["drop-only"] == [3, 3, 3]
    assert steps["ldb"] == [3, 3, 2] and steps["batch-only"] == [3, 3, 2]  # batch x2 on the DROP epoch
    assert [e["batch_size"] for e in runs["ldb"]] == [16, 16, 32]
    assert [e["mode"] for e in runs["ldb"]] == ["full", "full", "drop"]
    assert all(0.0 <= e["val_acc"] <= 1.0 and e["seconds"] > 0 for epochs in runs.values() for e in epochs)
    # Identical full epochs before the first DROP epoch: same weights, data and order in every variant.
    assert len({epochs[1]["val_acc"] for epochs in runs.values()}) == 1
    markdown = (tmp_path / "report.md").read_text()
    assert all(f"| {name} |" in markdown for name in runs) and (tmp_path / "report.png").stat().st_size > 0
    out = capsys.readouterr().out
    assert "[1/" in out and "epoch 2:" in out and "the dropping itself adds" in out


def test_stochastic_depth_and_mnist1d_run_end_to_end():
    sd = BenchConfig(model="resnet18", image_size=8, epochs=2, train_samples=8, val_samples=8, batch_size=4)
    epochs = run_variant(sd, "stochastic-depth", log=lambda line: None)["epochs"]
    assert [e["mode"] for e in epochs] == ["full", "full"] and [e["steps"] for e in epochs] == [2, 2]
    mnist1d = BenchConfig(model="mnist1d-cnn", variants=("baseline", "ldb"), epochs=3, train_samples=64,
                          val_samples=32, batch_size=16, repeats=1)  # fmt: skip
    result = run_benchmark(mnist1d, log=lambda line: None)
    assert [run["variant"] for run in result["runs"]] == ["baseline", "ldb"]
    assert [e["steps"] for e in result["runs"][1]["epochs"]] == [4, 4, 2]


def test_gpu_suite_runs_reduced_on_cpu(tmp_path):
    argv = ["--suite", "gpu", "--accelerator", "cpu", "--epochs", "2", "--every", "1", "--skip-epochs", "0",
            "--repeats", "1", "--train-samples", "2", "--val-samples", "2", "--batch-size", "2",
            "--image-size", "16", "--variants", "baseline,ldb", "--out", str(tmp_path)]  # fmt: skip
    assert cli.main(argv) == 0  # the full suite's other variants are the ones tested above, on a smaller model
    for model in ("resnet50", "vit-b16"):
        result = json.loads((tmp_path / model / "report.json").read_text())
        assert [run["variant"] for run in result["runs"]] == ["baseline", "ldb"]
        assert result["config"]["model"] == model and result["config"]["image_size"] == 16
    parser = cli.build_parser()
    suite = [cli.resolve(parser.parse_args(["--suite", "gpu"]), {**e, "suite": True}, parser) for e in cli.GPU_SUITE]
    expected = ("baseline", "ldb", "batch-only", "ldb-block")
    assert [(c.model, c.variants) for c in suite] == [("resnet50", expected), ("vit-b16", expected)]


def test_block_variant_trains_a_resnet_in_block_mode():
    config = BenchConfig(model="resnet18", image_size=8, epochs=3, train_samples=8, val_samples=8, batch_size=2)
    epochs = run_variant(config, "ldb-block", log=lambda line: None)["epochs"]
    assert [e["mode"] for e in epochs] == ["full", "full", "drop"] and [e["steps"] for e in epochs] == [4, 4, 2]
    assert "ldb-block" in VARIANTS


def test_block_variant_is_refused_for_a_model_without_residual_branches(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--quick", "--variants", "ldb-block"])
    assert "ldb-block needs residual branches, which --model digits_cnn has not" in capsys.readouterr().err
