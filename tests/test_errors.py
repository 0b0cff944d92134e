"""Bad input gets a clear error that names the problem and the fix."""

import pytest
import torch
from huggingface_hub.errors import StrictDataclassClassValidationError, StrictDataclassFieldValidationError
from transformers import BertConfig, BertForMaskedLM, BloomConfig, LlamaConfig, T5Config

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


def test_unknown_forward_arguments_are_not_silently_ignored():
    model, _ = make_model()
    ids = random_text(1, 6)
    model(ids, return_dict=True, output_attentions=False)  # habitual flags from Trainer/PEFT are accepted
    with pytest.raises(TypeError, match="inputs_embeds"):
        model(ids, inputs_embeds=torch.zeros(1, 6, 32))
    with pytest.raises(ValueError, match="DynamicCache"):
        model(ids, past_key_values=object())
