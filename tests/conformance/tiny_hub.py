"""A local stand-in for the Hugging Face Hub, for the ported peft examples and transformers cases.

The ported code keeps its ``AutoModel*.from_pretrained(model_name_or_path)`` and
``AutoTokenizer.from_pretrained(...)`` calls; only the hub id becomes ``tiny_hub.path("roberta-large")``:
a folder holding a randomly initialised 1-2 layer model of the same architecture and a tokenizer of
the same kind (byte-level BPE, WordPiece, SentencePiece-style unigram) over a tiny vocabulary.
Folders are built once per process, on first use.
"""
from __future__ import annotations

import atexit
import functools
import gc
import shutil
import string
import tempfile
from pathlib import Path

import torch
import transformers as tf
from transformers.convert_slow_tokenizer import bytes_to_unicode

# Every Trainer.train() runs gc.collect() (accelerate's free_memory), which walks every object alive:
# with torch, transformers, peft and TRL imported that is ~0.6 s a call on this machine. Objects that
# exist at this point (modules, classes) are moved out of the collector's reach once; later
# collections walk only what tests create.
gc.collect()
gc.freeze()

_ROOT = Path(tempfile.mkdtemp(prefix="tiny_hub_"))
atexit.register(shutil.rmtree, _ROOT, ignore_errors=True)
_SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)


def _byte_bpe(cls, specials: dict[str, str]):
    """A byte-level BPE tokenizer without merges: one token per byte, as GPT-2/RoBERTa/BART tokenize."""
    names = list(dict.fromkeys(specials.values()))
    vocab = {t: i for i, t in enumerate(names + sorted(set(bytes_to_unicode().values())))}
    return cls(vocab=vocab, merges=[], **specials)


def _wordpiece(lower: bool):
    chars = string.ascii_letters + string.digits + string.punctuation
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *chars, *("##" + c for c in chars),
             "John", "Mary", "lives", "works", "in", "at", "Berlin", "Paris", "Google", "the", "a", "is"]
    words = list(dict.fromkeys(w.lower() if lower else w for w in words))
    return tf.BertTokenizer(vocab={w: i for i, w in enumerate(words)}, do_lower_case=lower)


def _unigram():
    chars = string.ascii_letters + string.digits + string.punctuation
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [(c, -3.0) for c in chars] + [("▁" + c, -2.5) for c in string.ascii_letters]
    return tf.T5Tokenizer(vocab=pieces, extra_ids=0)


def _causal_tok():
    return _byte_bpe(tf.GPT2Tokenizer, dict(bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"))


def _build(kind: str):
    """(tokenizer, model) for one architecture; the vocabulary size follows the tokenizer."""
    if kind in ("bloom", "llama", "mistral", "gpt2", "opt"):
        tok = _causal_tok()
        ids = dict(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                   pad_token_id=tok.pad_token_id)
        if kind == "bloom":
            return tok, tf.BloomForCausalLM(tf.BloomConfig(hidden_size=32, n_layer=2, n_head=4, **ids))
        if kind == "gpt2":  # tied wte / lm_head
            return tok, tf.GPT2LMHeadModel(tf.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=256, **ids))
        if kind == "opt":  # tied embed_tokens / lm_head, as facebook/opt-*
            return tok, tf.OPTForCausalLM(tf.OPTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                       ffn_dim=64, word_embed_proj_dim=32, max_position_embeddings=256,
                                                       **ids))
        cfg_cls, model_cls = {"llama": (tf.LlamaConfig, tf.LlamaForCausalLM),
                              "mistral": (tf.MistralConfig, tf.MistralForCausalLM)}[kind]
        cfg = cfg_cls(**_SMALL, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False, **ids)
        return tok, model_cls(cfg)
    if kind == "roberta":
        tok = _byte_bpe(tf.RobertaTokenizer, dict(bos_token="<s>", pad_token="<pad>", eos_token="</s>",
                                                  unk_token="<unk>", mask_token="<mask>"))
        cfg = tf.RobertaConfig(vocab_size=len(tok), **_SMALL, max_position_embeddings=258, type_vocab_size=1,
                               pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                               eos_token_id=tok.eos_token_id)
        return tok, tf.RobertaModel(cfg)
    if kind in ("bert-cased", "bert-uncased"):
        tok = _wordpiece(lower=kind == "bert-uncased")
        cfg = tf.BertConfig(vocab_size=len(tok), **_SMALL, max_position_embeddings=256, pad_token_id=0)
        return tok, tf.BertModel(cfg)
    if kind == "layoutlm":
        tok = _wordpiece(lower=True)
        cfg = tf.LayoutLMConfig(vocab_size=len(tok), **_SMALL, max_position_embeddings=256, pad_token_id=0,
                                max_2d_position_embeddings=1024)
        return tok, tf.LayoutLMModel(cfg)
    if kind in ("t5", "mt5"):
        tok = _unigram()
        cfg_cls, model_cls = {"t5": (tf.T5Config, tf.T5ForConditionalGeneration),
                              "mt5": (tf.MT5Config, tf.MT5ForConditionalGeneration)}[kind]
        cfg = cfg_cls(vocab_size=len(tok), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                      decoder_start_token_id=tok.pad_token_id, pad_token_id=tok.pad_token_id,
                      eos_token_id=tok.eos_token_id)
        return tok, model_cls(cfg)
    if kind == "bart":
        tok = _byte_bpe(tf.BartTokenizer, dict(bos_token="<s>", pad_token="<pad>", eos_token="</s>",
                                               unk_token="<unk>", mask_token="<mask>"))
        cfg = tf.BartConfig(vocab_size=len(tok), d_model=32, encoder_layers=1, decoder_layers=1,
                            encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                            decoder_ffn_dim=64, max_position_embeddings=256, pad_token_id=tok.pad_token_id,
                            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                            decoder_start_token_id=tok.eos_token_id, forced_eos_token_id=tok.eos_token_id)
        return tok, tf.BartForConditionalGeneration(cfg)
    raise KeyError(kind)


HUB = {  # the hub ids the examples name -> the architecture of the tiny stand-in
    "bigscience/bloomz-560m": "bloom", "bigscience/bloomz-7b1": "bloom",
    "mistralai/Mistral-7B-v0.1": "mistral", "huggyllama/llama-7b": "llama",
    "meta-llama/Llama-2-7b-hf": "llama", "gpt2": "gpt2", "facebook/opt-125m": "opt",
    "roberta-large": "roberta", "microsoft/layoutlm-base-uncased": "layoutlm",
    "bert-base-cased": "bert-cased", "bert-base-uncased": "bert-uncased",
    "bigscience/mt0-large": "mt5", "t5-large": "t5", "google-t5/t5-small": "t5", "facebook/bart-base": "bart",
}


@functools.lru_cache(maxsize=None)
def path(hub_id: str) -> str:
    """The folder standing in for ``hub_id``: config, weights and tokenizer, as ``save_pretrained`` writes them."""
    kind = HUB[hub_id]
    folder = _ROOT / hub_id.replace("/", "--")
    torch.manual_seed(0)
    tok, model = _build(kind)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)
