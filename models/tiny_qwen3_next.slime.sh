# slime MODEL_ARGS for tiny_qwen3_next. Generated from models/tiny_qwen3_next/config.json by `make model-args`
# (tools/gen_model_args.py); edit the generator, not this file. Flags as slime's own
# scripts/models/qwen3-next-80B-A3B.sh (THUDM/slime 624b824) uses them, plus explicit zero dropout.
# Use: source models/tiny_qwen3_next.slime.sh in a slime run script, with --hf-checkpoint <HF dir> (slime's spec
# reads the layer types from its config.json) and --load <make convert ARGS="--format slime" output>.
# The converted checkpoint also carries the MTP block (mtp.layers.0.*): add --mtp-num-layers 1 to train it.
MODEL_ARGS=(
   --spec "slime_plugins.models.qwen3_next" "get_qwen3_next_spec"
   --num-layers 4
   --hidden-size 128
   --ffn-hidden-size 256
   --num-attention-heads 4
   --group-query-attention
   --num-query-groups 2
   --kv-channels 32
   --attention-output-gate
   --use-gated-attention
   --qk-layernorm
   --normalization RMSNorm
   --apply-layernorm-1p
   --norm-epsilon 1e-06
   --position-embedding-type rope
   --rotary-percent 0.25
   --rotary-base 10000000
   --max-position-embeddings 4096
   --swiglu
   --disable-bias-linear
   --vocab-size 151936
   --attention-dropout 0
   --hidden-dropout 0
   --untie-embeddings-and-output-weights
   --num-experts 8
   --moe-ffn-hidden-size 64
   --moe-router-topk 2
   --moe-router-score-function softmax
   --moe-layer-freq "[1,1,1,1]"
   --moe-aux-loss-coeff 0.001
   --moe-grouped-gemm
   --moe-token-dispatcher-type alltoall
   --moe-shared-expert-intermediate-size 64
   --moe-shared-expert-gate
)
