"""The language-model commands on input a careless or hostile user gives (issue 24, items 11-14): text that is
not text, few documents, endless generation, Ctrl-C, and arguments that used to be checked only after the
model was loaded. A tiny random Llama and a tiny BPE tokenizer: nothing is downloaded."""

from __future__ import annotations

import zlib
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from adn.cli import main  # noqa: E402
from adn.lm.corpus import CorpusError, load_corpus  # noqa: E402
from tests.test_lm import tiny  # noqa: E402

TEXT = str(Path(__file__).parents[1] / "docs" / "method.md")  # real English text shipped with the project


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny Llama (8 layers: 2 stages with the default grouping; context 512) and a tiny BPE tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("tiny-llama")
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.Whitespace()
    bpe.train_from_iterator(
        [Path(TEXT).read_text()], trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "<eos>"])
    )
    PreTrainedTokenizerFast(tokenizer_object=bpe, unk_token="<unk>", eos_token="<eos>").save_pretrained(folder)
    tiny(vocab=256).save_pretrained(folder)
    return folder


@pytest.fixture
def no_model_load(monkeypatch):
    """Loading the model is an error: what is checked must be checked before it."""

    def load(*args, **kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr("adn.lm.model.load_causal_lm", load)


def _error(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("adn: error: ")]
    assert lines, err[-2000:]
    return lines[-1]


# ----- item 11: text that is not text ---------------------------------------------------------------------------
def test_binary_or_non_utf8_text_is_refused_by_name(tmp_path, model_dir, capsys):
    import os

    binary = tmp_path / "random.txt"
    binary.write_bytes(os.urandom(20000))
    assert main(["eval-lm", "--model", str(model_dir), "--text", str(binary), "--no-speed"]) == 2
    message = _error(capsys)
    assert f"{binary} is not UTF-8 text" in message and "iconv" in message
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "good.txt").write_text(Path(TEXT).read_text())
    (folder / "wide.txt").write_bytes(Path(TEXT).read_text()[:4000].encode("utf-16-le"))  # valid UTF-8, half NULs
    with pytest.raises(CorpusError, match=r"wide.txt is not text: 50% of its characters are control characters"):
        load_corpus(folder)
    (folder / "bom.txt").write_bytes(b"\xef\xbb\xbf" + "caf\u00e9 au lait\n".encode() * 100)  # UTF-8, with a BOM
    (folder / "wide.txt").unlink()
    assert any(text.startswith("caf\u00e9") for text in load_corpus(folder).train + load_corpus(folder).heldout)


def test_a_few_documents_none_of_which_the_hash_holds_out_still_make_a_corpus(tmp_path):
    names = ["doc0.txt", "doc1.txt", "doc2.txt"]
    assert all(zlib.crc32(name.encode()) >= 0.1 * 2**32 for name in names)  # none falls into a 10% share
    document = Path(TEXT).read_text()[:20000]
    for name in names:
        (tmp_path / name).write_text(document)
    corpus = load_corpus(tmp_path, 0.1)
    assert len(corpus.train) == len(corpus.heldout) == 3 and all(corpus.heldout)
    assert "too few to hold whole documents out: the last 10% of each held out" in corpus.description
    with pytest.raises(CorpusError, match="too little text"):
        empty = tmp_path / "empty"
        empty.mkdir()
        (empty / "a.txt").write_text("\n")
        load_corpus(empty)


# ----- item 12: generation streams, is bounded, and stops on Ctrl-C ----------------------------------------------
class _Recorder:
    """stdout that records, for each write, how many forward passes had run."""

    def __init__(self, passes):
        self.passes, self.writes = passes, []

    def write(self, text):
        self.writes.append((self.passes[0], text))

    def flush(self):
        pass


def _count_passes(monkeypatch, fail_at: int | None = None) -> list[int]:
    import adn.lm.generate as generate

    passes = [0]
    real = generate._greedy_next

    def counted(*args, **kwargs):
        passes[0] += 1
        if fail_at is not None and passes[0] == fail_at:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(generate, "_greedy_next", counted)
    return passes


def test_generate_streams_tokens_as_they_are_decoded(model_dir, monkeypatch, capsys):
    passes = _count_passes(monkeypatch)
    out = _Recorder(passes)
    monkeypatch.setattr("sys.stdout", out)
    assert (
        main(["generate", "--model", str(model_dir), "--prompt", "adaptive depth networks", "--max-new-tokens", "12"])
        == 0
    )
    moments = {count for count, text in out.writes if text.strip()}
    assert len(moments) >= 3, out.writes  # written during the generation, not once at its end
    assert "".join(text for _, text in out.writes).endswith("\n")


def test_ctrl_c_keeps_what_was_generated(model_dir, monkeypatch, capsys):
    _count_passes(monkeypatch, fail_at=5)  # the prefill and three decoding passes, then Ctrl-C: 4 new tokens
    assert (
        main(["generate", "--model", str(model_dir), "--prompt", "adaptive depth networks", "--max-new-tokens", "50"])
        == 130
    )
    captured = capsys.readouterr()
    assert captured.out.strip() and captured.out.endswith("\n")
    assert "interrupted after 4 new token(s)" in captured.err
    _count_passes(monkeypatch, fail_at=3)
    assert main(["generate", "--model", str(model_dir), "--prompt", "adaptive depth", "--json"]) == 130
    import json

    result = json.loads(capsys.readouterr().out)
    assert result["interrupted"] is True and result["new_tokens"] == 2


def test_max_new_tokens_is_bounded_by_the_context(model_dir, no_model_load, capsys):
    assert main(["generate", "--model", str(model_dir), "--prompt", "x", "--max-new-tokens", "1000000000"]) == 2
    message = _error(capsys)
    assert "the model's context is 512 tokens" in message and "--max-new-tokens" in message


def test_prompt_and_new_tokens_must_fit_the_context_together(model_dir, capsys):
    prompt = " ".join(["adaptive depth networks"] * 200)
    assert main(["generate", "--model", str(model_dir), "--prompt", prompt, "--max-new-tokens", "500"]) == 2
    assert "the prompt takes" in _error(capsys)


# ----- item 13: arguments checked before the model is loaded ------------------------------------------------------
@pytest.mark.parametrize(
    "extra, fragment",
    [
        (["--skip", "TTTTT"], "--skip: invalid skip configuration 'TTTTT': it has 5 flags, expected 2"),
        (["--skip", "XYZ"], "--skip: invalid skip configuration 'XYZ'"),
        (["--speculative", "--draft", "TTTT"], "--draft: invalid skip configuration 'TTTT'"),
        (["--speculative", "--draft", "bse"], "--draft: invalid skip configuration 'bse'"),
    ],
)
def test_generate_checks_depths_before_loading(model_dir, no_model_load, capsys, extra, fragment):
    assert main(["generate", "--model", str(model_dir), "--prompt", "x", *extra]) == 2
    assert fragment in _error(capsys)


def test_an_empty_prompt_is_refused_before_loading(model_dir, no_model_load, capsys):
    for prompt in ("", "   "):
        assert main(["generate", "--model", str(model_dir), "--prompt", prompt]) == 2
        assert "--prompt is empty" in _error(capsys)


def test_eval_lm_checks_skip_before_loading(model_dir, no_model_load, capsys):
    assert main(["eval-lm", "--model", str(model_dir), "--text", TEXT, "--skip", "TTT"]) == 2
    assert "it has 3 flags, expected 2" in _error(capsys)


def test_train_lm_resume_from_an_image_checkpoint_fails_before_loading(model_dir, no_model_load, tmp_path, capsys):
    import adn
    from adn.utils.checkpoint_file import save_checkpoint

    net = adn.convert(adn.build_model("resnet20", num_classes=10, in_channels=1, width=4))
    save_checkpoint(tmp_path / "image.pt", net, {"model": "resnet20", "num_classes": 10, "in_channels": 1})
    assert (
        main(
            [
                "train-lm",
                "--model",
                str(model_dir),
                "--text",
                TEXT,
                "--output-dir",
                str(tmp_path / "run"),
                "--resume",
                str(tmp_path / "image.pt"),
                "--no-progress",
            ]
        )
        == 2
    )
    assert "is not a language-model checkpoint written by adn train-lm" in _error(capsys)
    torch.manual_seed(0)


# ----- issue 26: choosing the depth by decoding speed; the weights' dtype -------------------------------------------
def test_lm_depth_table_chooses_the_most_accurate_depth_that_is_fast_enough():
    from adn.lm.depth_table import LMDepthTable, LMDepthTableError

    rows = [
        {"skip": "FF", "ppl": 10.0, "tokens_per_s": 20.0},
        {"skip": "TF", "ppl": 12.0, "tokens_per_s": 24.0},
        {"skip": "FT", "ppl": 14.0, "tokens_per_s": 23.0},
        {"skip": "TT", "ppl": 15.0, "tokens_per_s": 30.0},
    ]
    for data in (rows, {"format": "adn-lm-depth-table", "version": 1, "setting": "x", "rows": rows}):
        table = LMDepthTable.from_dict(data)
        assert table.choose(5)["skip"] == "FF" and table.choose(20)["skip"] == "FF"
        assert table.choose(20.5)["skip"] == "TF" and table.choose(24)["skip"] == "TF"
        assert table.choose(25)["skip"] == "TT" and table.choose(30)["skip"] == "TT"
        assert [r["skip"] for r in table.front()] == ["TT", "TF", "FF"]  # FT: slower and worse than TF
        with pytest.raises(LMDepthTableError, match="the fastest measured is TT at 30.0 tokens/s"):
            table.choose(31)
    for bad, fragment in [
        ([], "non-empty list"),
        ([{"skip": "FF", "ppl": 3.0}], "written with --no-speed"),
        ([{"skip": "FQ", "ppl": 3.0, "tokens_per_s": 1.0}], "'skip' must be a depth"),
        (rows + [{"skip": "FFF", "ppl": 1.0, "tokens_per_s": 1.0}], "different lengths"),
        (rows + rows[:1], "appears twice"),
        ({"format": "adn-depth-table", "rows": rows}, "image"),
        ([{"skip": "FF", "ppl": float("nan"), "tokens_per_s": 1.0}], "positive number"),
    ]:
        with pytest.raises(LMDepthTableError, match=fragment):
            LMDepthTable.from_dict(bad)


def test_eval_lm_writes_a_depth_table_and_generate_picks_a_depth_by_speed(model_dir, tmp_path, capsys):
    import json

    table = tmp_path / "depths.json"
    assert (
        main(
            [
                "eval-lm",
                "--model",
                str(model_dir),
                "--text",
                TEXT,
                "--eval-tokens",
                "128",
                "--seq-len",
                "32",
                "--new-tokens",
                "4",
                "--threads",
                "1",
                "--json",
                "--save-json",
                str(table),
            ]
        )
        == 0
    )
    rows = json.loads(capsys.readouterr().out)
    saved = json.loads(table.read_text())
    assert saved["format"] == "adn-lm-depth-table" and saved["rows"] == rows
    assert saved["conditions"]["threads"] == 1 and saved["conditions"]["dtype"] in ("float32", "bfloat16")
    assert all(r["tokens_per_s"] > 0 and r["ppl"] > 1 for r in rows)
    # Rewrite the speeds so that the choice is known whatever this machine's timing noise.
    speeds = {"FF": 10.0, "TF": 12.0, "FT": 13.0, "TT": 20.0}
    for row in saved["rows"]:
        row["tokens_per_s"] = speeds[row["skip"]]
    table.write_text(json.dumps(saved))
    best_fast = min((r for r in saved["rows"] if r["tokens_per_s"] >= 12.5), key=lambda r: r["ppl"])["skip"]
    common = ["generate", "--model", str(model_dir), "--prompt", "adaptive depth", "--max-new-tokens", "3", "--json"]
    assert main([*common, "--depth-table", str(table), "--tokens-per-s", "12.5"]) == 0
    out = capsys.readouterr()
    result = json.loads(out.out)
    assert result["skip"] == best_fast and result["chosen_by_speed"]["measured_tokens_per_s"] == speeds[best_fast]
    assert f"depth {best_fast}" in out.err
    assert main([*common, "--depth-table", str(table), "--tokens-per-s", "5"]) == 0
    assert json.loads(capsys.readouterr().out)["skip"] == min(saved["rows"], key=lambda r: r["ppl"])["skip"]
    # The --json rows on stdout, redirected to a file, are a table too.
    (tmp_path / "rows.json").write_text(json.dumps(saved["rows"]))
    assert main([*common, "--depth-table", str(tmp_path / "rows.json"), "--tokens-per-s", "20"]) == 0
    assert json.loads(capsys.readouterr().out)["skip"] == "TT"


@pytest.mark.parametrize(
    "extra, fragment",
    [
        (["--tokens-per-s", "50"], "the fastest measured is TT at 20.0 tokens/s"),
        (["--tokens-per-s", "5"], None),  # no --depth-table: named below
        (["--depth-table", "TABLE"], "--depth-table is read only to choose a depth by --tokens-per-s"),
        (["--depth-table", "TABLE", "--tokens-per-s", "5", "--skip", "TT"], "either --skip"),
        (["--depth-table", "TABLE", "--tokens-per-s", "5", "--speculative"], "leave out --speculative"),
        (["--depth-table", "THREE", "--tokens-per-s", "5"], "describes a network of 3 stages, this one has 2"),
        (["--depth-table", "NOWHERE", "--tokens-per-s", "5"], "cannot be read"),
    ],
)
def test_generate_by_speed_says_what_is_wrong_before_loading(
    model_dir, no_model_load, tmp_path, capsys, extra, fragment
):
    import json

    rows = [{"skip": s, "ppl": p, "tokens_per_s": t} for s, p, t in [("FF", 9.0, 10.0), ("TT", 12.0, 20.0)]]
    (tmp_path / "t.json").write_text(json.dumps(rows))
    (tmp_path / "3.json").write_text(json.dumps([{"skip": "FFF", "ppl": 9.0, "tokens_per_s": 10.0}]))
    paths = {"TABLE": str(tmp_path / "t.json"), "THREE": str(tmp_path / "3.json"), "NOWHERE": str(tmp_path / "no.json")}
    extra = [paths.get(a, a) for a in extra]
    if fragment is None:
        fragment = "--tokens-per-s needs the measured speed of every depth: --depth-table FILE"
    else:
        extra = extra if "--depth-table" in extra else [*extra, "--depth-table", paths["TABLE"]]
    assert main(["generate", "--model", str(model_dir), "--prompt", "x", *extra]) == 2
    assert fragment in _error(capsys)


def test_bfloat16_weights_for_decoding_keep_the_rotary_buffers_in_float32(model_dir, capsys):
    import json

    import adn
    from adn.lm.generate import greedy_generate
    from adn.lm.precision import cast_weights, decoding_dtype
    from adn.training.precision import native_bfloat16

    assert decoding_dtype("auto") == (torch.bfloat16 if native_bfloat16("cpu") else torch.float32)
    assert decoding_dtype("float32") == torch.float32
    with pytest.raises(ValueError, match="dtype must be one of"):
        decoding_dtype("float16")
    net = cast_weights(adn.convert(tiny()), torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in net.parameters())
    assert all(b.dtype == torch.float32 for name, b in net.named_buffers() if "inv_freq" in name)
    # single-token steps take the matrix-vector kernel; the full forward below (many rows) the usual one
    assert not [m for m in net.modules() if type(m) is torch.nn.Linear]
    prompt = torch.tensor([[3, 5, 7, 11]])
    for config in ("FF", "TT"):
        out = greedy_generate(net, prompt, 6, skip=config)
        with torch.no_grad():
            full = net(out, skip=config).logits[0, 3:-1].float().argmax(-1)
        assert out.shape == (1, 10) and torch.equal(out[0, 4:], full)
    assert (
        main(
            [
                "generate",
                "--model",
                str(model_dir),
                "--prompt",
                "adaptive",
                "--max-new-tokens",
                "3",
                "--dtype",
                "bfloat16",
                "--json",
            ]
        )
        == 0
    )
    assert json.loads(capsys.readouterr().out)["dtype"] == "bfloat16"


def test_decode_benchmark_measures_bandwidth_both_dtypes_and_both_paths(model_dir, tmp_path, capsys):
    import importlib.util
    import json

    path = Path(__file__).parents[1] / "benchmarks" / "lm_decode.py"
    spec = importlib.util.spec_from_file_location("lm_decode", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    threads = torch.get_num_threads()
    try:
        assert (
            bench.main(
                [
                    "--model",
                    str(model_dir),
                    "--threads",
                    "1",
                    "--bandwidth-mb",
                    "8",
                    "--new-tokens",
                    "3",
                    "--prompt-tokens",
                    "8",
                    "--repeats",
                    "1",
                    "--ppl-tokens",
                    "64",
                    "--text",
                    TEXT,
                    "--save-json",
                    str(tmp_path / "decode.json"),
                ]
            )
            == 0
        )
    finally:
        torch.set_num_threads(threads)
    result = json.loads((tmp_path / "decode.json").read_text())
    assert result["setting"]["bandwidth"]["read_gb_s"] > 0 and result["setting"]["threads"] == 1
    assert [(r["skip"], r["dtype"], r["path"]) for r in result["rows"]] == [
        (skip, dtype, path)
        for skip in ("FF", "TT")
        for dtype in ("float32", "bfloat16")
        for path in ("forward", "engine")
    ]
    fp32, fp32_engine, bf16, bf16_engine = result["rows"][:4]
    assert bf16["weights_mb_per_token"] < 0.6 * fp32["weights_mb_per_token"]  # (the norms stay small either way)
    assert all(
        r["tokens_per_s"] > 0 and r["bound_tokens_per_s"] > r["tokens_per_s"] and r["ppl"] > 1 for r in result["rows"]
    )
    assert fp32["speed_vs_float32"] == 1.0  # the baseline: float32 through the model's own forward
    assert abs(fp32_engine["ppl_vs_float32"] - 1) < 1e-4  # the engine computes the same function
    assert abs(bf16["ppl_vs_float32"] - 1) < 0.05 and abs(bf16_engine["ppl_vs_float32"] - 1) < 0.05
    assert "memory bandwidth" in capsys.readouterr().out


def test_speculative_benchmark_with_a_restricted_draft_head_and_break_even(model_dir, tmp_path):
    import importlib.util
    import json

    path = Path(__file__).parents[1] / "benchmarks" / "lm_speculative.py"
    spec = importlib.util.spec_from_file_location("lm_speculative", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert abs(bench.break_even(0.5, 2, 1.0) - (5**0.5 - 1) / 2) < 1e-6  # (1 + a + a^2) / 2 = 1
    assert bench.break_even(1.0, 4, 1.2) is None  # a draft as costly as the target never pays
    threads = torch.get_num_threads()
    try:
        assert (
            bench.main(
                [
                    "--model",
                    str(model_dir),
                    "--text",
                    TEXT,
                    "--draft",
                    "base,none",
                    "--draft-tokens",
                    "2",
                    "--draft-vocab",
                    "0,40",
                    "--lookup",
                    "0,1",
                    "--prompts",
                    "2",
                    "--prompt-tokens",
                    "8",
                    "--new-tokens",
                    "6",
                    "--threads",
                    "1",
                    "--save-json",
                    str(tmp_path / "spec.json"),
                    "--plot",
                    str(tmp_path / "break-even.png"),
                ]
            )
            == 0
        )
    finally:
        torch.set_num_threads(threads)
    result = json.loads((tmp_path / "spec.json").read_text())
    assert result["identical"] is True
    depth_rows = [r for r in result["rows"] if r["draft"] == "TT" and r["lookup"] == 0]
    assert sorted(r["draft_vocab"] for r in depth_rows) == [40, 256]
    assert all(r["speed_up"] > 0 and r["draft_cost"] > 0 and r["verify_cost"] > 0 for r in depth_rows)
    # context drafts: with the base-net drafting the rest, or alone (no draft passes, no draft cost)
    assert sorted((r["draft"], r["lookup"]) for r in result["rows"]) == sorted(
        [("TT", 0), ("TT", 0), ("TT", 1), ("TT", 1), ("none", 1), ("none", 1)]
    )
    alone = [r for r in result["rows"] if r["draft"] == "none"]
    assert all(r["draft_cost"] == 0 and r["context_share"] in (0.0, 1.0) for r in alone)
    assert (tmp_path / "break-even.png").read_bytes()[:4] == b"\x89PNG"


def test_generate_speculative_with_a_restricted_draft_head_keeps_greedy_output(model_dir, capsys):
    import json

    common = ["generate", "--model", str(model_dir), "--prompt", "adaptive depth networks", "--max-new-tokens", "10"]
    assert main([*common, "--speculative", "--draft-tokens", "3", "--draft-vocab", "30", "--text", TEXT, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["speculative"]["identical_to_plain_greedy"] is True
    assert result["speculative"]["draft_vocab"] == 30
    assert main([*common, "--speculative", "--draft-vocab", "30", "--text", TEXT]) == 0
    assert "head of 30 tokens" in capsys.readouterr().err
    assert main([*common, "--speculative", "--draft-confidence", "0.5", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["speculative"]["identical_to_plain_greedy"] is True
    assert result["speculative"]["min_confidence"] == 0.5 and result["engine"] is True


def test_generate_speculative_with_context_drafts_keeps_greedy_output(model_dir, capsys):
    import json

    common = ["generate", "--model", str(model_dir), "--prompt", "adaptive depth adaptive depth adaptive depth"]
    for draft in ("none", "base"):
        args = [*common, "--max-new-tokens", "12", "--speculative", "--lookup", "2", "--draft", draft, "--json"]
        assert main(args) == 0
        result = json.loads(capsys.readouterr().out)["speculative"]
        assert result["identical_to_plain_greedy"] is True and result["lookup"] == 2
        assert result["lookup_drafted"] > 0 and result["draft"] == ("none" if draft == "none" else "TT")
    assert main([*common, "--speculative", "--lookup", "2"]) == 0
    assert "context drafts of 2-grams" in capsys.readouterr().err


def test_context_drafts_are_checked_before_loading(model_dir, no_model_load, capsys):
    common = ["generate", "--model", str(model_dir), "--prompt", "x"]
    assert main([*common, "--lookup", "2"]) == 2
    assert "--lookup drafts --speculative decoding" in _error(capsys)
    assert main([*common, "--speculative", "--draft", "none"]) == 2
    assert "--draft none leaves nothing to draft" in _error(capsys)
    assert main([*common, "--speculative", "--draft-tokens", "16"]) == 2
    assert "at most 15" in _error(capsys)
    with pytest.raises(SystemExit):
        main([*common, "--speculative", "--lookup", "-1"])
    assert "non-negative" in capsys.readouterr().err


def test_draft_vocab_is_checked_before_loading(model_dir, no_model_load, tmp_path, capsys):
    common = ["generate", "--model", str(model_dir), "--prompt", "x", "--draft-vocab", "30"]
    assert main([*common, "--text", TEXT]) == 2
    assert "add --speculative" in _error(capsys)
    assert main([*common, "--speculative", "--text", str(tmp_path / "nothing")]) == 2
    assert "no such file or folder" in _error(capsys)
    plain = ["generate", "--model", str(model_dir), "--prompt", "x", "--draft-confidence", "0.5"]
    assert main(plain) == 2
    assert "--draft-confidence sets the draft length of --speculative decoding" in _error(capsys)


def test_the_matrix_vector_path_gives_what_the_linear_layer_gives():
    from adn.lm.matvec import MatVecLinear, use_matvec_for_single_tokens

    torch.manual_seed(0)
    plain = torch.nn.Linear(48, 20).bfloat16()
    fast = torch.nn.Sequential(torch.nn.Linear(48, 20)).bfloat16()
    fast[0].load_state_dict(plain.state_dict())
    assert use_matvec_for_single_tokens(fast) == 1 and isinstance(fast[0], MatVecLinear)
    for shape in ((1, 1, 48), (48,), (1, 3, 48), (2, 1, 48)):  # one row: torch.mv; more: nn.Linear's kernel
        x = torch.randn(shape).bfloat16()
        assert torch.equal(fast(x), plain(x)) and fast(x).shape == plain(x).shape
    x = torch.randn(1, 48)  # float32 weights: the usual kernel, whatever the rows
    assert torch.equal(fast.float()(x), plain.float()(x))
