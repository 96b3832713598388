"""Models in and out of quietgpt: Hugging Face GPT-2 import refusing anything it cannot reproduce exactly
(hf_import.py), initialisation of a run from a pretrained GPT-2 with each variant's own parameters set by
its rule (pretrained.py), export to a Hugging Face folder (hf_export.py) with the self-contained modeling
file shipped beside it (hf_modeling/, which imports only torch and transformers)."""
