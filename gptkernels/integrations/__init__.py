"""Bindings of gptkernels into other libraries' extension points. Each submodule imports its library lazily:
``import gptkernels`` never imports them. ``gptkernels.integrations.hf``: Hugging Face transformers."""
