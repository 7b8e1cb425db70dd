# akod_ray image for the Ray cluster launcher (cluster/a100.yaml, cluster/gcp-a2.yaml).
#
# Build and push where Docker runs (not on the dev machine), with a pinned tag:
#   docker build -t ghcr.io/akod-ray/akod-ray:0.1.0 .
#   docker push ghcr.io/akod-ray/akod-ray:0.1.0
#
# Base: the official Ray image, pinned to the Ray version of requirements.txt and to
# Python 3.11 ("-gpu" = Ray's default CUDA flavour; rayproject/ray-ml is deprecated).
# It runs as the non-root user "ray" (uid 1000, group users, HOME=/home/ray) with Python
# in /home/ray/anaconda3, owned by ray: pip needs no root here.
FROM rayproject/ray:2.60.0-py311-gpu

USER ray
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    TORCH_HOME=/home/ray/.cache/torch

WORKDIR /home/ray/akod_ray

# Dependencies first, in their own layer: code changes do not reinstall torch.
# requirements.txt holds the runtime pins only (pyproject.toml's dependencies; no test tools):
# ray[default,rllib,train,tune]==2.60.0 (the base image's Ray, so pip only adds the missing
# extras), torch, torchvision, pytorch-fid, ...
COPY --chown=ray:users requirements.txt ./requirements.txt
RUN pip install -r requirements.txt \
 && python -c "import ray; assert ray.__version__ == '2.60.0', ray.__version__"

# FID needs pytorch-fid's Inception weights (pt_inception-2015-12-05-6726825d.pth).
# Fetch them now into $TORCH_HOME/hub/checkpoints, where torch.hub looks at run time,
# so that cluster nodes never download them.
RUN python -c "from pytorch_fid.inception import fid_inception_v3; fid_inception_v3()" \
 && test -s "$TORCH_HOME/hub/checkpoints/pt_inception-2015-12-05-6726825d.pth"

# The project itself (see .dockerignore for what stays out), without touching the
# pinned dependencies above and without its `test` extra. `ray job submit --working-dir .`
# ships your checkout on top.
COPY --chown=ray:users . .
RUN pip install --no-deps . \
 && python -c "import akod_ray"

# The optional integrations a cluster run may ask for: pyproject's `mlflow` extra (run.tracking: mlflow, and
# `mlflow server` on the head: docs/cluster.md) and `optuna` extra (sweep.search: optuna); never the `test` extra.
# The project's own pins are exact, so the resolver keeps the dependencies installed above.
RUN pip install ".[mlflow,optuna]" \
 && python -c "import mlflow, optuna, ray; assert ray.__version__ == '2.60.0', ray.__version__"

USER ray
