"""Model architectures, weight loaders (HF safetensors directories, GGUF files) and the model zoo.

Import from the submodules (``loomlm.models.loader``, ``loomlm.models.zoo``): this
package file stays empty so that importing one model module does not pull in
every loader's dependencies.
"""
