#!/bin/sh
# Installs torch into a virtual environment during the image build.
#   install-torch.sh PIP VARIANT VERSION WHEELS_DIR CPU_INDEX_URL
# cpu:  a torch wheel of VERSION in WHEELS_DIR if there is one (machines whose pip reaches
#       no CPU index put it there), else torch from CPU_INDEX_URL (empty: the default index).
# cuda: torch from the default index: PyPI's Linux x86_64 torch is the CUDA build, and its
#       nvidia-* dependencies carry the CUDA runtime, so the base image needs no CUDA.
set -eu

pip="$1"
variant="$2"
version="$3"
wheels="$4"
cpu_index="$5"

case "$variant" in
    cpu)
        if ls "$wheels"/torch-"$version"*.whl >/dev/null 2>&1; then
            "$pip" install --no-cache-dir --no-index --no-deps --find-links "$wheels" \
                "torch==$version"
        else
            "$pip" install --no-cache-dir ${cpu_index:+--index-url "$cpu_index"} \
                "torch==$version"
        fi
        ;;
    cuda)
        "$pip" install --no-cache-dir "torch==$version"
        ;;
    *)
        echo "TORCH_VARIANT must be cpu or cuda, not '$variant'" >&2
        exit 2
        ;;
esac
