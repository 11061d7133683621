#!/usr/bin/env bash
# Pack Python wheels a GPU machine lacks (it reaches no package index) into carry-sized parts, in the
# layout scripts/gpu_check.sh installs with SR_GPU_PACK=1: DIR/p1 .. DIR/pN, the last holding `install`.
#
#   bash scripts/pack_gpu_wheels.sh DIR REQUIREMENT... [-- PRESENT_NAME...]
#   bash scripts/pack_gpu_wheels.sh .gpu-ray "ray[serve]==2.60.0" -- $(cat present.txt)
#
# Downloads REQUIREMENT and its dependencies as CPython 3.12 manylinux x86-64 wheels, leaves out every
# distribution named after `--` (what the machine's image already has: no second copy, whose version
# could clash), tars the rest and splits the tar into parts of PART_MB (default 40: a part travels beside
# the working tree, and a call takes 64 MiB in all). Carry DIR/p1 .. DIR/pN-1 in earlier calls and copy
# them to /tmp/parts; the last call carries DIR/pN, whose `install` joins the parts, checks the sha256 and
# installs the wheels into /tmp/site (put it on PYTHONPATH). DIR must be git-ignored.
set -euo pipefail
dir=${1:?usage: pack_gpu_wheels.sh DIR REQUIREMENT... [-- PRESENT_NAME...]}
shift
reqs=() present=()
while (( $# )); do
    if [ "$1" = "--" ]; then shift; present=("$@"); break; fi
    reqs+=("$1"); shift
done
(( ${#reqs[@]} )) || { echo "pack_gpu_wheels: name at least one requirement" >&2; exit 2; }
PY=${PYTHON:-python3}
part_bytes=$(( ${PART_MB:-40} * 1000 * 1000 ))
rm -rf "$dir" && mkdir -p "$dir/dl"
"$PY" -m pip download -q --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$dir/dl" "${reqs[@]}"
"$PY" - "$dir/dl" "${present[@]}" <<'EOF'
import pathlib, re, sys
def norm(name: str) -> str:  # distribution names compare case-insensitively, with -, _ and . alike
    return re.sub(r"[-_.]+", "-", name).lower()
folder, present = pathlib.Path(sys.argv[1]), {norm(n) for n in sys.argv[2:]}
for wheel in folder.glob("*.whl"):
    if norm(wheel.name.split("-")[0]) in present:
        wheel.unlink()
EOF
ls "$dir"/dl/*.whl > /dev/null 2>&1 || { echo "pack_gpu_wheels: nothing left to pack" >&2; exit 1; }
tar cf "$dir/wheels.tar" -C "$dir/dl" .
sum=$(sha256sum "$dir/wheels.tar" | cut -d' ' -f1)
split -b "$part_bytes" -d -a 1 "$dir/wheels.tar" "$dir/wheels.part"
rm -rf "$dir/dl" "$dir/wheels.tar"
i=1
for f in "$dir"/wheels.part*; do mkdir -p "$dir/p$i"; mv "$f" "$dir/p$i/"; i=$((i + 1)); done
n=$((i - 1))
cat > "$dir/p$n/install" <<EOS
#!/usr/bin/env bash
# Joins the parts (earlier ones in /tmp/parts, the last beside this file) and installs the wheels into /tmp/site.
set -e
here=\$(cd "\$(dirname "\$0")" && pwd)
cat /tmp/parts/wheels.part* "\$here"/wheels.part* > /tmp/wheels.tar 2>/dev/null || cat "\$here"/wheels.part* > /tmp/wheels.tar
echo "$sum  /tmp/wheels.tar" | sha256sum -c --quiet
rm -rf /tmp/wheels && mkdir -p /tmp/wheels /tmp/site && tar xf /tmp/wheels.tar -C /tmp/wheels && rm -f /tmp/wheels.tar
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site /tmp/wheels/*.whl
EOS
chmod +x "$dir/p$n/install"
du -sh "$dir"/p*
echo "parts: $n; carry $dir/p1 .. $dir/p$((n > 1 ? n - 1 : 1)) first (copy to /tmp/parts), $dir/p$n last"
