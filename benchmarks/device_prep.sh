# Source this on a fresh GPU machine, from the repository root: `source benchmarks/device_prep.sh`.
# 1. installs the wheels in .whl/ (made by ../shared/device/wheels.sh or pip download) into .site/;
# 2. points Triton's cache at .gpucache/triton (compiled kernels and autotuning results) and torch.compile's at
#    .gpucache/inductor (compiled graphs: megatron's jit_fuser, our fused ops); carry the folder
#    to a fresh machine of the same GPU and software and the first step skips most of its compiling);
# 3. applies the fla patches. The GDN parity check that enables the guarded Hopper kernel (~5 min cold)
#    runs unless .gpucache/fla_parity.json holds a passing record for this GPU name, compute capability,
#    Triton, torch and patched source: the record's key names all five, and the patched fla checks the
#    key itself, so a record from another GPU or software version enables nothing.
# Afterwards `bash benchmarks/device_prep.sh pack DIR` (run, not sourced) writes .gpucache as DIR/gc.part.* (15 MiB
# pieces of one .txz, since files that come back are capped at 16 MiB); copy the pieces into .gpucarry/ (git-ignored)
# and carry that folder: the next machine unpacks it here before anything else. 427 MB of cache is 21 MB packed.
if [ "${1:-}" = pack ]; then
  # xz: 427 MB of cache is 21 MB (gzip: 59 MB, too much to carry with the wheels). tar exits 1 when a file
  # changed while read (a killed run's compile worker still writing): the rest is packed
  tar --warning=no-file-changed -cf - .gpucache | xz -9 -T0 > /tmp/gpucache.txz
  st=("${PIPESTATUS[@]}")
  [ "${st[0]}" -le 1 ] && [ "${st[1]}" -eq 0 ] && rm -f "${2:?pack needs a directory}"/gc.part.* \
    && split -b 15M /tmp/gpucache.txz "$2/gc.part." && ls -l "$2"
  exit 0
fi
if compgen -G ".gpucarry/gc.part.*" > /dev/null && [ ! -d .gpucache ]; then
  cat .gpucarry/gc.part.* > /tmp/gpucarry.pack && tar xf /tmp/gpucarry.pack && rm /tmp/gpucarry.pack && echo "[prep] unpacked the carried .gpucache ($(du -sh .gpucache | cut -f1))"
fi
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target .site .whl/*.whl || return 1
mkdir -p .gpucache/triton
export PYTHONPATH=$PWD/.site:$PWD/src TRITON_CACHE_DIR=$PWD/.gpucache/triton TRITON_CACHE_AUTOTUNING=1 \
  TORCHINDUCTOR_CACHE_DIR=$PWD/.gpucache/inductor \
  QNEXT_FLA_PARITY_STAMP=$PWD/.gpucache/fla_parity.json PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
if [ -s .gpucache/fla_parity.json ]; then
  python3 -m qnext.patches apply --no-verify | tail -2
  python3 -c "from qnext.kernels.record import recorded; import sys; r = recorded(); print('[prep] carried parity record matches this machine:', r); sys.exit(0 if r else 1)" \
    || { echo "[prep] record does not match: running the parity check"; python3 -m qnext.patches apply | tail -3; }
else
  python3 -m qnext.patches apply | tail -3
fi
