"""One tiny random-weight builder per supported family, `<family>.py` beside `architectures/<family>/`
(Hugging Face configs, a fixed seed, no hub): the family tests and the overhead benchmark run on
them. Import a builder from its family's module (`from mmlens.testing.families.gemma3 import
tiny_gemma3`); `common.py` holds what the builders share.
"""
