# cachefs image: workers (`cachefs worker ...`), plain-Kubernetes mounts
# (`cachefs mount ...`) and Fluid ThinRuntime FUSE pods (`cachefs fluid-mount`).
# Built with: docker build -t ghcr.io/example/cachefs:0.1.0 .
FROM python:3.11-slim-bookworm

# The tools Fluid execs in the FUSE container (bash, df, ls, grep, wc, umount,
# fusermount3) and the probes use.
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        bash coreutils grep util-linux fuse3 \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/cachefs
COPY setup.py setup.cfg pyproject.toml README.md ./
COPY native/ native/
COPY cachefs/ cachefs/
COPY scripts/setup.sh scripts/setup.sh

# The same install script as the README: the rest of the build packages,
# .venv with the package and its native extension (no test tools:
# CACHEFS_EXTRAS empty). Fail the build if the native hot path did not compile.
RUN CACHEFS_EXTRAS= bash scripts/setup.sh \
    && .venv/bin/python -c 'import cachefs.hotpath as h, sys; sys.exit(h.IMPLEMENTATION != "native")' \
    && rm -rf /var/lib/apt/lists/* /root/.cache

ENV PATH=/opt/cachefs/.venv/bin:$PATH \
    PYTHONUNBUFFERED=1

# Fluid's ThinRuntime worker has no command override, so the entrypoint is
# the CLI; manifests pass the subcommand as args.
ENTRYPOINT ["cachefs"]
CMD ["worker", "--help"]
