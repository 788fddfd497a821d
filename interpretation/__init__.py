"""Medical image interpretation with MedITok as a language model's vision tower (paper Table 4; docs/vqa.md).

``vision_tower`` (frozen MedITok → the tokens the language model sees), ``model`` (projector + placeholder
expansion + conversation templates on any ``transformers`` causal LM, LoRA through ``peft``), ``data`` (readers for
PubMedVision / LLaVA-Med JSON, plain CSV, VQA-RAD and SLAKE), ``train`` (stage A projector pre-training, stage B
LoRA instruction tuning), ``scoring`` (the VQA answer-matching conventions), ``tiny`` (a tiny random LM for tests).
"""
