"""Bad input gets a clear error that names the problem and the fix."""

import pytest
import torch
from huggingface_hub.errors import StrictDataclassClassValidationError, StrictDataclassFieldValidationError
from transformers import AutoModelForCausalLM, BertConfig, BertForMaskedLM, BloomConfig, LlamaConfig, T5Config

import quietstar
from conftest import make_model, make_tokenizer, random_text

TEXT = LlamaConfig(vocab_size=66, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4)
IDS = dict(start_thought_token_id=64, end_thought_token_id=65)


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(thought_length=0), "thought_length"),
        (dict(n_thoughts=0), "n_thoughts"),
        (dict(lookahead=0), "lookahead"),
        (dict(mixer_hidden_size=0), "mixer_hidden_size"),
        (dict(thought_temperature=-1.0), "thought_temperature"),
        (dict(policy_weight=float("nan")), "policy_weight"),
        (dict(base_loss_weight=-0.5), "base_loss_weight"),
        (dict(thought_embedding_scale=0.0), "thought_embedding_scale"),
        (dict(start_thought_token_id=64, end_thought_token_id=None), "Set both"),
        (dict(start_thought_token_id=64, end_thought_token_id=64), "distinct"),
        (dict(start_thought_token_id=64, end_thought_token_id=66), "vocab_size=66"),
    ],
)
def test_invalid_config_values(fields, message):
    with pytest.raises(StrictDataclassClassValidationError) as error:
        quietstar.QuietStarConfig(text_config=TEXT, **{**IDS, **fields})
    assert message in str(error.value.__cause__)


def test_wrong_config_types():
    with pytest.raises(StrictDataclassFieldValidationError, match="thought_length"):
        quietstar.QuietStarConfig(text_config=TEXT, thought_length="twelve")


@pytest.mark.parametrize(
    "text_config, message",
    [(BertConfig(), "encoder-only"), (T5Config(), "encoder-decoder")],
)
def test_non_decoder_bases_are_rejected(text_config, message):
    with pytest.raises(StrictDataclassClassValidationError) as error:
        quietstar.QuietStarConfig(text_config=text_config)
    assert message in str(error.value.__cause__)


def test_from_base_rejects_an_encoder_only_model():
    bert = BertForMaskedLM(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=32))
    with pytest.raises(StrictDataclassClassValidationError) as error:
        quietstar.QuietStarForCausalLM.from_base(bert, make_tokenizer())
    assert "decoder-only causal LM" in str(error.value.__cause__)


def test_base_whose_attention_bypasses_the_attention_interface_is_rejected():
    config = quietstar.QuietStarConfig(
        text_config=BloomConfig(vocab_size=66, hidden_size=32, n_layer=1, n_head=4), **IDS
    )
    with pytest.raises(ValueError, match="BloomForCausalLM is not supported.*AttentionInterface"):
        quietstar.QuietStarForCausalLM(config)


def test_tokenizer_without_thought_tokens():
    with pytest.raises(ValueError, match="no <\\|startofthought\\|> / <\\|endofthought\\|> token.*from_base"):
        quietstar.thought_token_ids(make_tokenizer())


def test_model_without_thought_token_ids():
    model = quietstar.QuietStarForCausalLM(quietstar.QuietStarConfig(text_config=TEXT))
    with pytest.raises(ValueError, match="no thought token ids.*from_base"):
        model(random_text(1, 6))


def test_from_base_needs_a_tokenizer():
    model, _ = make_model()
    with pytest.raises(ValueError, match="tokenizer"):
        quietstar.QuietStarForCausalLM.from_base(model.model, None)


def test_sequence_shorter_than_lookahead_plus_one():
    model, _ = make_model(lookahead=4)
    ids = random_text(1, 4)
    with pytest.raises(ValueError, match="shorter than lookahead \\+ 1 = 5"):
        model(ids, labels=ids)
    assert model(ids).logits.shape[:2] == (1, 4)  # without labels no lookahead is needed


def test_left_padding_is_rejected():
    model, _ = make_model()
    ids = random_text(1, 6)
    with pytest.raises(ValueError, match="right padding"):
        model(ids, attention_mask=torch.tensor([[0, 1, 1, 1, 1, 1]]))


def test_wrong_thought_ids_shape():
    model, _ = make_model(thought_length=3, n_thoughts=2)
    ids = random_text(1, 6)
    with pytest.raises(ValueError, match="thought_ids must have shape"):
        model(ids, thought_ids=random_text(2 * 6, 3).reshape(1, 2, 6, 3)[..., :2])


def test_policy_training_with_a_single_thought():
    model, _ = make_model(n_thoughts=1)
    ids = random_text(1, 6)
    with pytest.raises(ValueError, match="n_thoughts >= 2"):
        model.train()(ids, labels=ids)


def test_a_cache_that_cannot_drop_thoughts_is_refused():
    model, _ = make_model()
    with pytest.raises(ValueError, match="DynamicCache"):
        model(random_text(1, 6), cache=object())


# ---- bad input: a ValueError that names the input and the fix, raised before anything changes ---------------------


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda m, ids: m(ids[:, :0]), "`input_ids` is empty \\(shape \\(1, 0\\)\\).*at least one token"),
        (lambda m, ids: m(ids[0]), "`input_ids` must be a \\(batch, length\\) tensor"),
        (lambda m, ids: m(ids.float()), "`input_ids` must hold integer token ids.*\\.long\\(\\)"),
        (lambda m, ids: m(ids + 100), "`input_ids` holds token id 1\\d\\d, outside the vocabulary of 66 tokens"),
        (lambda m, ids: m(ids, labels=ids[:, :-1]), "`labels` \\(1, 5\\) must have the shape of `input_ids` \\(1, 6\\)"),
        (lambda m, ids: m(ids, labels=ids.float()), "`labels` must hold integer token ids"),
        (lambda m, ids: m(ids, labels=ids * 0 - 5), "`labels` holds token id -5.*-100 \\(ignored\\) or in \\[0, 66\\)"),
        (lambda m, ids: m(ids, thought_ids=torch.full((1, 2, 6, 3), 70)), "`thought_ids` holds token id 70"),
        (lambda m, ids: m(ids, labels=ids.index_fill(1, torch.tensor([3]), 65)),
         "`labels` holds the thought-marker token id 65.*-inf.*Set those positions of `labels` to -100"),
    ],
)
def test_bad_token_inputs(call, message):
    model, _ = make_model()
    ids = random_text(1, 6)
    with pytest.raises(ValueError, match=message):
        call(model.train(), ids)


def test_labels_with_ignored_positions_are_fine():
    model, _ = make_model()
    ids = random_text(1, 6)
    labels = ids.clone()
    labels[:, :2] = -100
    assert torch.isfinite(model.train()(ids, labels=labels).loss)


def _words_tokenizer(words, unk_token):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(words)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token=unk_token) if unk_token else models.WordLevel(vocab))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, **({"unk_token": unk_token} if unk_token else {}))


@pytest.mark.parametrize(
    "first_word, unk_token",
    [("<unk>", "<unk>"), ("<unk>", None), ("w63", None)],
    ids=["dashes-unknown", "unk-not-declared", "encoding-fails"],
)
def test_tokenizer_without_dashes_falls_back_to_the_mean_embedding_with_a_warning(first_word, unk_token):
    words = [first_word] + [f"w{i}" for i in range(63)]  # no "---"
    base = AutoModelForCausalLM.from_config(LlamaConfig(**{**TEXT.to_dict(), "vocab_size": 64}))
    with pytest.warns(UserWarning, match="'---'.*mean input embedding"):
        model, tokenizer = quietstar.QuietStarForCausalLM.from_base(base, _words_tokenizer(words, unk_token))
    expected = base.get_input_embeddings().weight.float().mean(dim=0)
    torch.testing.assert_close(model.marker_embeddings()[0].float(), expected)
    assert len(tokenizer) == 66


def test_from_base_changes_nothing_before_an_error():
    tokenizer = make_tokenizer()
    base = make_model()[0].model
    base.resize_token_embeddings(64)
    vocab_before, rows_before = dict(tokenizer.get_vocab()), base.get_input_embeddings().weight.shape[0]
    for fields in (dict(thought_length=0), dict(n_thoughts=-1), dict(thought_attention_backend="cuda")):
        with pytest.raises((ValueError, StrictDataclassClassValidationError)):
            quietstar.QuietStarForCausalLM.from_base(base, tokenizer, **fields)
    assert tokenizer.get_vocab() == vocab_before and base.get_input_embeddings().weight.shape[0] == rows_before


def test_from_base_after_a_backward_on_the_base():
    """A two-stage pipeline trains the base, then wraps it: the resized embedding's old .grad must not break the
    next backward."""
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(LlamaConfig(**{**TEXT.to_dict(), "vocab_size": 64}))
    ids = random_text(1, 8)
    base(ids, labels=ids).loss.backward()
    model, _ = quietstar.QuietStarForCausalLM.from_base(base, make_tokenizer(), thought_length=2, lookahead=2)
    model.train()(ids, labels=ids).loss.backward()
    assert model.get_input_embeddings().weight.grad.shape == model.get_input_embeddings().weight.shape
