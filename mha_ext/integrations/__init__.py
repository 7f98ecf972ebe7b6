"""Integrations of mha_ext with other libraries; each submodule imports its library only when used.

* ``mha_ext.integrations.transformers``: Hugging Face transformers' ``attn_implementation="mha_ext"``.
"""
