"""Model host and the built-in tiny model: tokenizer, deterministic build, loading, errors."""

from __future__ import annotations

import json
import pathlib
import threading

import pytest
import torch
import transformers
from safetensors.torch import load_file

from replica_agent.engine import tiny
from replica_agent.engine.model_host import load_base_model, load_hf_model
from replica_agent.engine.tiny import TinySpec, build_tokenizer, ensure_tiny_model

UNICODE_TEXT = "naïve café — 日本語テキスト, emoji 🎉👩‍💻, tabs\tand\r\nnewlines, NUL \x00, \U0010ffff"

# A few seconds to build: enough to check determinism and the cache, not to learn anything.
MICRO_SPEC = TinySpec(
    hidden_size=64,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    intermediate_size=128,
    pretrain_steps=4,
    pretrain_batch_size=2,
    pretrain_seq_len=32,
    pretrain_warmup_steps=2,
)


def windows_loss(model: transformers.PreTrainedModel, stream: torch.Tensor, seq_len=128, count=16) -> float:
    generator = torch.Generator().manual_seed(7)
    starts = torch.randint(0, len(stream) - seq_len - 1, (count,), generator=generator)
    batch = torch.stack([stream[s : s + seq_len + 1] for s in starts.tolist()])
    with torch.no_grad():
        logits = model(input_ids=batch[:, :-1]).logits
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten()).item()


# --- tokenizer ---------------------------------------------------------------------------------


def test_byte_tokenizer_round_trips_unicode_one_token_per_byte():
    tokenizer = build_tokenizer()
    ids = tokenizer.encode(UNICODE_TEXT, add_special_tokens=False)
    assert ids == list(UNICODE_TEXT.encode("utf-8"))
    assert tokenizer.decode(ids) == UNICODE_TEXT
    assert len(tokenizer) == 259
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (256, 257, 258)


def test_byte_tokenizer_prepends_bos_and_skips_specials_when_decoding():
    tokenizer = build_tokenizer()
    encoded = tokenizer("hi")
    assert encoded.input_ids == [257, ord("h"), ord("i")]
    assert set(encoded) == {"input_ids", "attention_mask"}  # no token_type_ids: Llama's forward rejects them
    assert tokenizer.decode(encoded.input_ids + [258], skip_special_tokens=True) == "hi"


def test_byte_tokenizer_gives_replacement_char_for_cut_utf8():
    tokenizer = build_tokenizer()
    ids = list("é🎉".encode())
    assert tokenizer.decode(ids[:1]) == "\ufffd"
    assert tokenizer.decode(ids[:-1]).startswith("é")
    assert "\ufffd" in tokenizer.decode(ids[:-1])


def test_saved_tokenizer_loads_back_with_auto_tokenizer(tiny_model_dir):
    loaded = transformers.AutoTokenizer.from_pretrained(tiny_model_dir, local_files_only=True)
    assert loaded.encode(UNICODE_TEXT) == build_tokenizer().encode(UNICODE_TEXT)
    prompt = loaded.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert prompt == "user: hi\nassistant: "


# --- building the tiny model -------------------------------------------------------------------


def test_spec_fingerprint_depends_on_every_field():
    assert TinySpec().fingerprint() == TinySpec().fingerprint()
    assert TinySpec(seed=1).fingerprint() != TinySpec().fingerprint()
    assert TinySpec(pretrain_lr=1e-3).fingerprint() != TinySpec().fingerprint()


def test_tiny_config_is_a_gqa_llama():
    config = tiny.tiny_config()
    assert config.model_type == "llama"
    assert config.vocab_size % 8 == 0 and config.vocab_size >= 259
    assert (config.num_attention_heads, config.num_key_value_heads) == (4, 2)
    assert config.tie_word_embeddings
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (257, 258, 256)


def test_build_is_deterministic_bit_for_bit(tmp_path):
    first = ensure_tiny_model(tmp_path / "a", MICRO_SPEC)
    second = ensure_tiny_model(tmp_path / "b", MICRO_SPEC)
    assert first.name == second.name == f"tiny-{MICRO_SPEC.fingerprint()[:12]}"
    a, b = load_file(first / "model.safetensors"), load_file(second / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_build_restores_thread_count_and_rng(tmp_path):
    threads = torch.get_num_threads()
    torch.manual_seed(99)
    expected = torch.rand(3)
    torch.manual_seed(99)
    ensure_tiny_model(tmp_path, MICRO_SPEC)
    assert torch.get_num_threads() == threads
    assert torch.equal(torch.rand(3), expected)


def test_concurrent_callers_build_once_and_later_calls_hit_the_cache(tmp_path, monkeypatch):
    real_build, builds = tiny._build, []

    def counting_build(target, spec):
        builds.append(target)
        return real_build(target, spec)

    monkeypatch.setattr(tiny, "_build", counting_build)
    results: list[pathlib.Path] = []

    def call() -> None:
        results.append(ensure_tiny_model(tmp_path, MICRO_SPEC))

    threads = [threading.Thread(target=call) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(builds) == 1
    assert len(set(results)) == 1 and len(results) == 3
    assert ensure_tiny_model(tmp_path, MICRO_SPEC) == results[0] and len(builds) == 1
    leftovers = [p.name for p in (tmp_path / "models").iterdir() if p.is_dir() and p != results[0]]
    assert leftovers == []


def test_cache_dir_defaults_to_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("COLLM_CACHE_DIR", str(tmp_path))
    assert ensure_tiny_model(spec=MICRO_SPEC).parent == tmp_path / "models"


def test_pretraining_learned_prose_and_not_code(tiny_model_dir):
    model, _ = load_hf_model("tiny")
    info = json.loads((tiny_model_dir / "collm_tiny.json").read_text())
    spec = TinySpec(**info["spec"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        untrained = transformers.LlamaForCausalLM(tiny.tiny_config(spec)).eval()
    prose = tiny.document_token_stream(tiny.prose_documents("eval"))  # topics the build never saw
    code = tiny.document_token_stream([p.read_text() for p in sorted(pathlib.Path(json.__file__).parent.glob("*.py"))])

    pretrained_prose = windows_loss(model, prose)
    assert windows_loss(untrained, prose) - pretrained_prose > 2.0  # about 5.6 -> 2.1 nats/byte
    assert pretrained_prose < 3.0
    assert windows_loss(model, code) - pretrained_prose > 0.3  # the domain gap LoRA on code closes


# --- loading -------------------------------------------------------------------------------------


def test_load_tiny_gives_frozen_llama_weights(tiny_base):
    base = tiny_base
    assert base.name == "tiny" and base.source == "tiny"
    assert base.config.model_type == "llama"
    assert base.dtype == torch.float32 and base.device == torch.device("cpu")
    assert base.max_context == 1024
    assert base.eos_token_ids == (258,) and base.bos_token_id == 257
    expected_names = {"model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight", "lm_head.weight"}
    assert expected_names <= set(base.state_dict)
    assert base.state_dict["lm_head.weight"] is base.state_dict["model.embed_tokens.weight"]  # tied, one copy
    assert base.state_dict["model.layers.0.self_attn.k_proj.weight"].shape == (128, 256)  # 2 KV heads of 64
    for name, tensor in base.state_dict.items():
        assert not tensor.requires_grad and tensor.is_contiguous(), name
        assert tensor.dtype == torch.float32 and tensor.device.type == "cpu", name


def test_load_base_model_matches_hf_weights(tiny_base):
    model, tokenizer = load_hf_model("tiny")
    assert not any(p.requires_grad for p in model.parameters())
    assert not model.training
    reference = model.state_dict()
    assert reference.keys() == tiny_base.state_dict.keys()
    for name, tensor in reference.items():
        assert torch.equal(tensor, tiny_base.state_dict[name]), name
    assert tokenizer.encode("abc") == tiny_base.tokenizer.encode("abc")


def test_load_from_directory_path_and_in_bfloat16(tiny_model_dir):
    base = load_base_model(str(tiny_model_dir), dtype="bfloat16")
    assert base.name == tiny_model_dir.name and base.source == str(tiny_model_dir)
    assert base.dtype == torch.bfloat16
    assert {t.dtype for t in base.state_dict.values()} == {torch.bfloat16}


# --- errors a user can cause ---------------------------------------------------------------------


def test_unknown_source_lists_accepted_sources(tmp_path):
    with pytest.raises(ValueError, match="does not exist; accepted sources: 'tiny'"):
        load_base_model("llama-7b-please")
    text_file = tmp_path / "weights.bin"
    text_file.write_bytes(b"")
    with pytest.raises(ValueError, match="is not a .gguf file"):
        load_base_model(str(text_file))
    with pytest.raises(ValueError, match="no config.json"):
        load_base_model(str(tmp_path))


def test_an_unsupported_architecture_is_rejected_naming_the_supported_ones(tmp_path):
    transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"model_type 'gpt2' is not supported; CoLLM serves Llama \('llama'\), Mistral .*Qwen2 .*Qwen3"):
        load_base_model(str(tmp_path))
    with pytest.raises(ValueError, match="random:<family>"):
        load_base_model("random:gpt2")


@pytest.mark.parametrize("dtype", ["float64", "fp32", "int8"])
def test_bad_dtype_fails_before_any_build(tmp_path, dtype):
    with pytest.raises(ValueError, match="use 'auto' or one of float32, bfloat16, float16"):
        load_base_model("tiny", dtype=dtype, cache_dir=tmp_path)
    assert not (tmp_path / "models").exists()


@pytest.mark.parametrize("device", ["tpu", "gpu0", "mps"])
def test_bad_device_is_rejected(tmp_path, device):
    with pytest.raises(ValueError, match="device"):
        load_base_model("tiny", device=device, cache_dir=tmp_path)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without CUDA")
def test_cuda_without_cuda_says_so(tmp_path):
    with pytest.raises(ValueError, match="CUDA is not available.*device='cpu'"):
        load_base_model("tiny", device="cuda:0", cache_dir=tmp_path)


# --- the real pretrained model -------------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_loads_from_gguf():
    base = load_base_model("smollm2")
    assert base.name == "smollm2"
    assert base.config.model_type == "llama" and base.config.vocab_size == 49152
    assert base.state_dict["model.embed_tokens.weight"].shape == (49152, 576)
    assert base.max_context == 8192
    # The GGUF says: no BOS added, EOS is <|im_end|> (transformers' conversion loses both).
    assert base.eos_token_ids == (2,) and base.tokenizer.eos_token == "<|im_end|>"
    text = "Hello, world! Ünïcödé — 日本 🎉\n    def f(x):\n        return x"
    ids = base.tokenizer.encode(text)
    assert ids[0] != base.bos_token_id
    assert base.tokenizer.decode(ids) == text
    assert all(not t.requires_grad for t in base.state_dict.values())
