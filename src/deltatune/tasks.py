"""peft's task classes of :class:`PeftModel`, one per ``TaskType``: ``get_peft_model`` and ``from_pretrained``
pick the class from the config's ``task_type`` (each class adds itself when defined)."""
from __future__ import annotations

from typing import ClassVar

from deltatune.config import PeftConfig, TaskType
from deltatune.model import PeftModel


class PeftModelForCausalLM(PeftModel):
    """Explicit arguments so transformers' Trainer sees ``labels`` and keeps the dataset's columns."""

    for_task: ClassVar[TaskType] = TaskType.CAUSAL_LM
    pipeline_tag = "text-generation"

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, labels=None, **kwargs):
        return super().forward(
            input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds, labels=labels, **kwargs
        )


class PeftModelForSequenceClassification(PeftModelForCausalLM):
    """peft's class for ``TaskType.SEQ_CLS``: the classifier head (``classifier`` or ``score``) is added to ``modules_to_save`` and trains in full."""

    for_task: ClassVar[TaskType] = TaskType.SEQ_CLS


class PeftModelForTokenClassification(PeftModelForCausalLM):
    """peft's class for ``TaskType.TOKEN_CLS``; ``forward`` takes ``labels`` explicitly, as for causal LMs."""

    for_task: ClassVar[TaskType] = TaskType.TOKEN_CLS


class PeftModelForQuestionAnswering(PeftModel):
    """peft's class for ``TaskType.QUESTION_ANS`` (extractive QA, ``*ForQuestionAnswering`` models): the span
    head ``qa_outputs`` is added to ``modules_to_save`` and trains in full, as peft does. ``forward`` passes
    ``start_positions``/``end_positions`` through; its signature is the base model's, so Trainer keeps them."""

    for_task: ClassVar[TaskType] = TaskType.QUESTION_ANS
    qa_module_names: ClassVar[tuple[str, ...]] = ("qa_outputs",)

    def _prepare_config(self, config: PeftConfig) -> PeftConfig:
        if hasattr(config, "modules_to_save"):  # prompt-learning configs have none, as in peft
            extra = [n for n in self.qa_module_names if n not in (config.modules_to_save or ())]
            config = config.replace(modules_to_save=tuple(config.modules_to_save or ()) + tuple(extra))
        return super()._prepare_config(config)


class PeftModelForFeatureExtraction(PeftModel):
    """peft's class for ``TaskType.FEATURE_EXTRACTION`` (embedding models); the same as :class:`PeftModel`."""

    for_task: ClassVar[TaskType] = TaskType.FEATURE_EXTRACTION


class PeftModelForSeq2SeqLM(PeftModel):
    """Encoder-decoder models (T5, BART, mT5), with the decoder inputs named as in peft's class."""

    for_task: ClassVar[TaskType] = TaskType.SEQ_2_SEQ_LM

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, decoder_input_ids=None,
                decoder_attention_mask=None, decoder_inputs_embeds=None, labels=None, **kwargs):
        return super().forward(
            input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds,
            decoder_input_ids=decoder_input_ids, decoder_attention_mask=decoder_attention_mask,
            decoder_inputs_embeds=decoder_inputs_embeds, labels=labels, **kwargs,
        )
