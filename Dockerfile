# Production image: NGC PyTorch (CUDA, NCCL, Transformer Engine, Python 3.12) + our pinned stack.
# We keep the base image's torch and Transformer Engine (built for its CUDA); everything else is
# installed at the versions pinned in pyproject.toml, then the matching kernel patches are applied.
#   docker build -t qnext .
#   docker run --gpus all --ipc=host --ulimit memlock=-1 -v /data:/data -it qnext make doctor
ARG BASE=nvcr.io/nvidia/pytorch:25.11-py3
FROM ${BASE}

ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
WORKDIR /opt/qnext
COPY pyproject.toml README.md ./
COPY scripts/pinned_deps.py scripts/
RUN python -c 'import sys; assert sys.version_info >= (3, 12), "megatron-core 0.19 needs Python >= 3.12"' \
 && python scripts/pinned_deps.py torch | xargs pip install
COPY . .
RUN pip install --no-deps -e . \
 && (python -m qnext.patches apply || echo "no kernel patch applies at build time; make doctor re-checks on the GPU")
CMD ["make", "help"]
