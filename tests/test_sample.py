"""sample.py's bad input (one line, exit 2) and its notes, run in-process on Hugging Face
directories written by models/hf.py save_hf; models/generate.py's argument checks."""
import numpy as np
import pytest

import sample
from models.gpt import GPT, GPTConfig
from models.hf import save_hf


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """A byte-level model (vocab 256: text) and an ids-only one (vocab 40), block_size 8."""
    out = {}
    for name, vocab in (("bytes", 256), ("ids", 40)):
        d = tmp_path_factory.mktemp(name)
        save_hf(GPT(GPTConfig(block_size=8, vocab_size=vocab, n_layer=1, n_head=2, n_embd=16), rng=0), str(d))
        out[name] = str(d)
    return out


def run(capsys, *argv):
    rc = sample.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "-0.5"])
def test_temperature_must_be_finite_and_not_negative(dirs, capsys, value):
    rc, out, err = run(capsys, "--hf", dirs["bytes"], "--prompt", "ab", f"--temperature={value}",
                       "--max-new-tokens", "2")
    assert rc == 2 and out == "" and err.startswith("error: --temperature must be a finite number >= 0")
    assert err.count("\n") == 1


def test_a_prompt_longer_than_the_block_is_cropped_with_one_note(dirs, capsys):
    rc, out, err = run(capsys, "--hf", dirs["bytes"], "--prompt", "x" * 20, "--max-new-tokens", "3",
                       "--temperature", "0")
    assert rc == 0 and out.startswith("x" * 20)
    assert err.count("\n") == 1 and err.startswith("note: the prompt has 20 tokens, more than the model's "
                                                   "block_size 8: it sees only the last 8")
    rc, _, err = run(capsys, "--hf", dirs["bytes"], "--prompt", "x" * 8, "--max-new-tokens", "1")
    assert rc == 0 and err == ""


def test_text_prompt_on_an_ids_model_points_to_prompt_ids(dirs, capsys):
    rc, out, err = run(capsys, "--hf", dirs["ids"], "--prompt", "hello there", "--max-new-tokens", "2")
    assert rc == 2 and out == "" and err.count("\n") == 1
    assert err.startswith("error: this model has no text tokenizer (token ids 0..39): give the prompt as ids "
                          "with --prompt-ids") and "invalid literal" not in err
    rc, out, _ = run(capsys, "--hf", dirs["ids"], "--prompt-ids", "1 2 3", "--max-new-tokens", "2")
    assert rc == 0 and out.startswith("1 2 3 ")
    rc, _, err = run(capsys, "--hf", dirs["ids"], "--prompt", "1 2", "--prompt-ids", "1 2")
    assert rc == 2 and "not both" in err


def test_generate_refuses_bad_arguments():
    model = GPT(GPTConfig(block_size=8, vocab_size=16, n_layer=1, n_head=2, n_embd=16), rng=0)
    prompt = np.array([[1, 2, 3]])
    for kwargs, match in ((dict(max_new_tokens=-3), "max_new_tokens must be an integer >= 0, got -3"),
                          (dict(max_new_tokens=1.5), "max_new_tokens must be an integer"),
                          (dict(max_new_tokens=2, temperature=float("nan")), "temperature must be a finite"),
                          (dict(max_new_tokens=2, temperature=float("inf")), "temperature must be a finite")):
        with pytest.raises(ValueError, match=match):
            model.generate(prompt, **kwargs)
    assert model.generate(prompt, 0).shape == (1, 3)
