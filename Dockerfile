# The serving image: an official Ray image whose tag matches the pinned ray version (tests check it),
# with the project and its generated gRPC stubs installed by the same script CI runs (tools/setup.sh).
# Models are mounted at /models (k8s/models-pvc.yaml) or baked in with --build-arg BAKE_MODELS=1.
ARG RAY_VERSION=2.60.0
FROM rayproject/ray:${RAY_VERSION}-py311-gpu

ARG BAKE_MODELS=0
WORKDIR /home/ray/specdec
COPY --chown=ray:users pyproject.toml README.md ./
COPY --chown=ray:users cluster/ cluster/
COPY --chown=ray:users deployments/ deployments/
COPY --chown=ray:users proto/ proto/
COPY --chown=ray:users tools/ tools/
COPY --chown=ray:users benchmarks/ benchmarks/
COPY --chown=ray:users configs/ configs/

# Same install steps as CI, into the image's Python (no venv: Ray's workers must import the project).
ENV SPECDEC_PYTHON=python SPECDEC_EXTRAS=""
RUN bash tools/setup.sh \
    && python -m tools.gen_proto \
    && if [ "$BAKE_MODELS" = "1" ]; then python -m tools.fetch_models --out /home/ray/models --qwen; fi

USER 1000
EXPOSE 8000 50051
