"""The modeling file `quietgpt export` writes next to the weights of a model whose attention is not plain
softmax (`modeling_quietgpt.py`: QuietGPTConfig + QuietGPTForCausalLM). It imports only torch and
transformers, never quietgpt, so a user without quietgpt loads the export with
`AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`. Importing this package imports
nothing; quietgpt.interop.hf_export imports the module itself (which needs transformers) to build the model."""
