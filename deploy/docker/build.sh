#!/usr/bin/env bash
# Builds the two worker images of charts/trainer from this checkout, tagged as the chart's default values
# expect them (docs/kubernetes.md, "The image"). Needs Docker with BuildKit (RUN --mount, per-Dockerfile
# .dockerignore files). Uses only bash and sed besides docker.
set -euo pipefail

case ${BASH_SOURCE[0]} in
    */*) here=${BASH_SOURCE[0]%/*} ;;
    *) here=. ;;
esac
root=$(cd "$here/../.." && pwd)
chart="$root/charts/trainer"
# The chart's defaults: image.repository in values.yaml, the tag prefix appVersion in Chart.yaml.
default_repository=$(sed -n '/^image:/,/^[^ #]/s/^  repository: *//p' "$chart/values.yaml")
default_version=$(sed -n 's/^appVersion: *"\{0,1\}\([^"]*\)"\{0,1\} *$/\1/p' "$chart/Chart.yaml")

usage() {
    printf '%s\n' \
        "usage: deploy/docker/build.sh [--repository REPO] [--version VERSION] [--only gpu|cpu] [--push] [-- DOCKER_BUILD_ARG...]" \
        "" \
        "Builds the worker images of charts/trainer from this checkout (run it from anywhere):" \
        "  REPO:VERSION-gpu  from deploy/docker/Dockerfile      the workers with gpusPerWorker > 0" \
        "  REPO:VERSION-cpu  from deploy/docker/Dockerfile.cpu  the workers with gpusPerWorker 0, and the ingest" \
        "With VERSION the chart's appVersion, these are the images the chart runs when its image.repository is REPO." \
        "" \
        "  --repository REPO  where the images go, e.g. registry.example.com/imagenet-k8s-trainer" \
        "                     (default: the chart's image.repository, $default_repository)" \
        "  --version VERSION  the tags' prefix (default: the chart's appVersion, $default_version)" \
        "  --only gpu|cpu     build one of the two" \
        "  --push             docker push the images once both are built" \
        "  -h, --help         this help" \
        "Arguments after -- go to every docker build, e.g. -- --build-arg TF_VERSION=2.21.0 --platform linux/amd64"
}

fail() {   # one line on stderr, then exit with the given code
    printf 'build.sh: %s\n' "$2" >&2
    exit "$1"
}

repository=$default_repository
version=$default_version
variants=(gpu cpu)
push=false
build_args=()
while [ $# -gt 0 ]; do
    case $1 in
        -h | --help) usage; exit 0 ;;
        --repository | --version | --only)
            if [ $# -lt 2 ] || [ -z "$2" ]; then fail 2 "$1 needs a value (see --help)"; fi
            case $1 in
                --repository) repository=$2 ;;
                --version) version=$2 ;;
                --only)
                    case $2 in
                        gpu | cpu) variants=("$2") ;;
                        *) fail 2 "--only $2: gpu or cpu" ;;
                    esac ;;
            esac
            shift 2 ;;
        --push) push=true; shift ;;
        --) shift; build_args=("$@"); break ;;
        *) fail 2 "unknown argument $1 (see --help)" ;;
    esac
done

# Docker's reference grammar, simplified: lowercase path components, an optional registry port, no tag.
[[ $repository =~ ^[a-z0-9]+([._-][a-z0-9]+)*(:[0-9]+)?(/[a-z0-9]+(([._]|__|-+)[a-z0-9]+)*)*$ ]] ||
    fail 2 "--repository $repository: a lowercase image repository without a tag, e.g. registry.example.com/imagenet-k8s-trainer"
# A tag is at most 128 characters of [A-Za-z0-9_.-], not starting with . or -; "-gpu" takes 4.
[[ $version =~ ^[A-Za-z0-9_][A-Za-z0-9_.-]{0,123}$ ]] ||
    fail 2 "--version $version: letters, digits, _ . - (not first), at most 124 characters"
command -v docker >/dev/null || fail 1 "docker not found on PATH: install Docker with BuildKit, or build where it is"

declare -A dockerfile=([gpu]=deploy/docker/Dockerfile [cpu]=deploy/docker/Dockerfile.cpu)
cd "$root"   # the build context: COPY names paths from the repository root
for variant in "${variants[@]}"; do
    tag="$repository:$version-$variant"
    echo "build.sh: building $tag from ${dockerfile[$variant]}"
    status=0
    DOCKER_BUILDKIT=1 docker build -f "${dockerfile[$variant]}" -t "$tag" ${build_args[@]+"${build_args[@]}"} . ||
        status=$?
    [ "$status" -eq 0 ] || fail "$status" "docker build of $tag from ${dockerfile[$variant]} failed (exit $status)"
done
if $push; then
    for variant in "${variants[@]}"; do
        tag="$repository:$version-$variant"
        status=0
        docker push "$tag" || status=$?
        [ "$status" -eq 0 ] || fail "$status" "docker push $tag failed (exit $status): logged in to the registry?"
    done
fi
for variant in "${variants[@]}"; do
    echo "build.sh: $repository:$version-$variant"
done
