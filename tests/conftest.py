import os

# Triton kernels run on CPU only in the interpreter, which must be chosen before triton is imported.
if os.environ.get("OLMO_LOCAL_TEST_GPU") != "1":
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
