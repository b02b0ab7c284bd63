# The same steps the Makefile proves on a fresh machine: install the pinned lock, run the demo.
# (No Docker engine exists on the development machines; keep this to what `make demo` does.)
FROM python:3.11-slim-bookworm

RUN apt-get update \
 && apt-get install -y --no-install-recommends make git dataset-fashion-mnist \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /app
COPY requirements.lock pyproject.toml Makefile README.md ./
COPY lmeraser ./lmeraser
RUN make install

COPY . .
# DVC needs a git repository; a build context has none.
RUN git init -q && git add -A && git -c user.name=docker -c user.email=docker@localhost commit -qm image

CMD ["make", "demo"]
