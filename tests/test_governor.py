"""adn.Governor and the depth table: synthetic tables on a simulated clock, then a real table from a
tiny trained checkpoint through the command line."""

from __future__ import annotations

import json
import random
import threading
import time

import pytest

import adn
from adn.cli import main
from adn.deploy.depth_table import DepthTable, DepthTableError

# Three depths; at batch 8 every time is 4x batch 1's. p99 = 1.5 x p50.
P50 = {"TTT": 2.0, "TTF": 4.0, "FFF": 8.0}
ACC = {"TTT": 70.0, "TTF": 75.0, "FFF": 80.0}


def table_dict(**changes) -> dict:
    depths = [
        {
            "skip": s,
            "acc1": ACC[s],
            "macs": int(P50[s] * 1e6),
            "latency_ms": {"1": {"p50": P50[s], "p99": 1.5 * P50[s]}, "8": {"p50": 4 * P50[s], "p99": 6 * P50[s]}},
        }
        for s in ("FFF", "TTT", "TTF")
    ]
    return {"format": "adn-depth-table", "version": 1, "batch_sizes": [1, 8], "depths": depths, **changes}


def simulate(gov, steps: int, slowdown=lambda step: 1.0, jitter: float = 0.0, seed: int = 0) -> list[str]:
    """A loop on a simulated machine: each batch takes its depth's median times the slowdown (and noise)."""
    rng = random.Random(seed)
    chosen = []
    for step in range(steps):
        decision = gov.select(1)
        ms = P50[str(decision.skip)] * slowdown(step) * (1 + rng.uniform(-jitter, jitter))
        gov.observe(decision.skip, 1, ms / 1e3)
        chosen.append(str(decision.skip))
    return chosen


def test_picks_the_most_accurate_depth_that_fits():
    assert str(adn.Governor(table_dict(), budget_ms=13).select(1).skip) == "FFF"  # p99 12 fits
    decision = adn.Governor(table_dict(), budget_ms=10).select(1)
    assert (str(decision.skip), decision.predicted_ms, decision.fits, decision.acc1) == ("TTF", 6.0, True, 75.0)


def test_a_tighter_slack_picks_a_shallower_depth():
    gov = adn.Governor(table_dict(), budget_ms=13)
    assert str(gov.select(1, slack_ms=7).skip) == "TTF"
    assert str(gov.select(1, slack_ms=3.5).skip) == "TTT"
    assert str(gov.select(8, slack_ms=13).skip) == "TTT"  # batch 8: 12, 24, 48 ms


def test_reports_when_not_even_the_fastest_depth_fits():
    decision = adn.Governor(table_dict(), budget_ms=13).select(1, slack_ms=1.0)
    assert (str(decision.skip), decision.fits, decision.predicted_ms) == ("TTT", False, 3.0)


def test_batch_size_interpolation():
    table = DepthTable.from_dict(table_dict())
    fastest = table.index("TTT")
    assert table.latency(fastest, 4) == pytest.approx(3 + (12 - 3) * 3 / 7)  # p99 between batches 1 and 8
    assert table.latency(fastest, 16) == pytest.approx(24)  # past the largest: its time per image
    assert table.latency(fastest, 4, "p50") == pytest.approx(2 + (8 - 2) * 3 / 7)
    gov = adn.Governor(table, budget_ms=100)
    assert gov.predict_ms("TTT", 4) == pytest.approx(table.latency(fastest, 4))


def test_a_slowdown_moves_it_down_within_a_few_observations_and_back_up_after():
    gov = adn.Governor(table_dict(), budget_ms=14)  # FFF fits (p99 12) with room for 1.06x
    chosen = simulate(gov, 60, slowdown=lambda step: 2.0 if 10 <= step < 30 else 1.0)
    assert set(chosen[:10]) == {"FFF"}
    assert "FFF" not in chosen[13:30], chosen  # down within 3 slow observations
    assert chosen[30:].index("FFF") <= 20 and chosen[-1] == "FFF", chosen  # up again after it ends
    assert gov.factor == pytest.approx(1.0, abs=0.05)


def test_a_caller_that_sheds_everything_gets_a_probe_after_a_few_batches():
    gov = adn.Governor(table_dict(), budget_ms=3.5)  # only TTT fits (p99 3 ms), up to a 1.17x slowdown
    for _ in range(3):
        gov.observe("TTT", 1, 2 * P50["TTT"] / 1e3)
    shed = 0
    while not gov.select(1).fits:  # the caller sheds: runs nothing, observes nothing
        shed += 1
        assert shed < 20, "the governor never let the fastest depth run again"
    assert 1 <= shed <= 10 and gov.factor < 3.5 / 3


def test_no_flapping_when_times_jitter_around_a_boundary():
    def switches(gov) -> int:
        chosen = simulate(gov, 400, jitter=0.10, seed=3)
        return sum(a != b for a, b in zip(chosen, chosen[1:]))

    # FFF's p99 (12 ms) is exactly the budget: +-10% noise puts it on either side of the line.
    assert switches(adn.Governor(table_dict(), budget_ms=12)) <= 2
    assert switches(adn.Governor(table_dict(), budget_ms=12, up_margin=0, min_dwell=0)) > 10  # what it prevents


def test_thread_safe_under_concurrent_select_and_observe():
    gov = adn.Governor(table_dict(), budget_ms=13)
    errors = []

    def work():
        try:
            for _ in range(2000):
                decision = gov.select(1)
                gov.observe(decision.skip, 1, P50[str(decision.skip)] / 1e3)
        except Exception as error:  # noqa: BLE001 - any failure in a thread must fail the test
            errors.append(error)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and gov.factor == pytest.approx(1.0)


def test_select_costs_microseconds():
    gov = adn.Governor(table_dict(), budget_ms=13)
    gov.select(8)
    start = time.perf_counter()
    for _ in range(10_000):
        gov.select(8)
    per_call_us = (time.perf_counter() - start) / 10_000 * 1e6
    assert per_call_us < 100, per_call_us  # ~2-4 us on a 2-core EPYC; lenient for a loaded machine


@pytest.mark.parametrize(
    "change, expected",
    [
        ({"depths": []}, "'depths' must be a non-empty list"),
        ({"batch_sizes": [8, 1]}, "increasing list of positive integers"),
        ({"batch_sizes": [1, 8, 32]}, "no latency for batch size 32"),
        ({"format": "something-else"}, "this adn reads 'adn-depth-table'"),
    ],
)
def test_malformed_tables_are_named(change, expected):
    with pytest.raises(DepthTableError, match=expected):
        DepthTable.from_dict(table_dict(**change))


def test_malformed_rows_are_named(tmp_path):
    def broken(edit) -> str:
        data = table_dict()
        edit(data["depths"][0])
        with pytest.raises(DepthTableError) as error:
            DepthTable.from_dict(data, source="t.json")
        return str(error.value)

    assert "depths[0]: no 'acc1'" in broken(lambda row: row.pop("acc1"))
    assert "invalid skip configuration 'FXF'" in broken(lambda row: row.update(skip="FXF"))
    assert "p99 (1.0) is below p50" in broken(lambda row: row["latency_ms"]["1"].update(p99=1.0))
    assert "must be a positive number of milliseconds" in broken(lambda row: row["latency_ms"]["8"].update(p50="fast"))
    assert "appears twice" in broken(lambda row: row.update(skip="TTT"))
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(DepthTableError, match="not valid JSON"):
        adn.Governor(tmp_path / "bad.json", budget_ms=10)
    with pytest.raises(ValueError, match="quantile 0.9"):
        adn.Governor(table_dict(), budget_ms=10, quantile=0.9)
    with pytest.raises(ValueError, match="not in the depth table"):
        adn.Governor(table_dict(), budget_ms=10).observe("FTF", 1, 0.01)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    run = tmp_path_factory.mktemp("gov-run")
    assert (
        main(
            [
                "train",
                "--model",
                "resnet20",
                "--width",
                "4",
                "--data",
                "fake",
                "--epochs",
                "1",
                "--max-steps-per-epoch",
                "2",
                "-b",
                "16",
                "--output-dir",
                str(run),
                "--no-progress",
            ]
        )
        == 0
    )
    return run


def test_depth_table_from_a_trained_checkpoint_answers_budgets(trained, capsys):
    assert (
        main(
            [
                "eval",
                "--checkpoint",
                str(trained / "checkpoint.pt"),
                "--json",
                "--no-latency",
                "--no-plot",
                "--val-subset",
                "32",
            ]
        )
        == 0
    )
    (trained / "eval.json").write_text(capsys.readouterr().out)
    assert (
        main(
            [
                "depth-table",
                "--checkpoint",
                str(trained / "checkpoint.pt"),
                "--eval",
                str(trained / "eval.json"),
                "--batch-sizes",
                "1,4",
                "--repeats",
                "5",
                "--warmup",
                "1",
            ]
        )
        == 0
    )
    assert "depths on the Pareto front" in capsys.readouterr().out
    path = trained / "depth_table.json"
    data = json.loads(path.read_text())
    assert data["batch_sizes"] == [1, 4] and data["conditions"]["backend"] == "eager"
    assert {"device", "threads", "torch", "date", "repeats"} <= set(data["conditions"])
    table = DepthTable.load(path)
    assert all(
        row["macs"] > 0 and row["latency_ms"]["4"]["p99"] >= row["latency_ms"]["4"]["p50"] for row in table.depths
    )

    assert main(["pareto", "--table", str(path), "--budget-ms", "1000", "--batch-size", "4", "--json"]) == 0
    answer = json.loads(capsys.readouterr().out)
    assert answer["fits"] and answer["skip"] == table.depths[-1]["skip"]
    assert main(["pareto", "--table", str(path), "--budget-ms", "0.0001"]) == 0
    assert "none fits" in capsys.readouterr().out
    assert str(adn.Governor(path, budget_ms=1000).select(4).skip) == table.depths[-1]["skip"]


def test_budget_errors_are_clear(tmp_path, capsys):
    assert main(["pareto", "--budget-ms", "5"]) == 2
    assert "--budget-ms and --table go together" in capsys.readouterr().err
    (tmp_path / "t.json").write_text(json.dumps({"batch_sizes": [1], "depths": [{"skip": "TTT"}]}))
    assert main(["pareto", "--table", str(tmp_path / "t.json"), "--budget-ms", "5"]) == 2
    assert "adn: error:" in (err := capsys.readouterr().err) and "no 'acc1'" in err
    assert main(["pareto"]) == 2
    assert "give --eval" in capsys.readouterr().err
