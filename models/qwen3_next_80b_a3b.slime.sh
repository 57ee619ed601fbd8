# slime MODEL_ARGS for qwen3_next_80b_a3b. Generated from models/qwen3_next_80b_a3b/config.json by `make model-args`
# (tools/gen_model_args.py); edit the generator, not this file. Flags as slime's own
# scripts/models/qwen3-next-80B-A3B.sh (THUDM/slime 624b824) uses them, plus explicit zero dropout.
# Use: source models/qwen3_next_80b_a3b.slime.sh in a slime run script, with --hf-checkpoint <HF dir> (slime's spec
# reads the layer types from its config.json) and --load <make convert ARGS="--format slime" output>.
# The converted checkpoint also carries the MTP block (mtp.layers.0.*): add --mtp-num-layers 1 to train it.
MODEL_ARGS=(
   --spec "slime_plugins.models.qwen3_next" "get_qwen3_next_spec"
   --num-layers 48
   --hidden-size 2048
   --ffn-hidden-size 5120
   --num-attention-heads 16
   --group-query-attention
   --num-query-groups 2
   --kv-channels 256
   --attention-output-gate
   --use-gated-attention
   --qk-layernorm
   --normalization RMSNorm
   --apply-layernorm-1p
   --norm-epsilon 1e-06
   --position-embedding-type rope
   --rotary-percent 0.25
   --rotary-base 10000000
   --max-position-embeddings 262144
   --swiglu
   --disable-bias-linear
   --vocab-size 151936
   --attention-dropout 0
   --hidden-dropout 0
   --untie-embeddings-and-output-weights
   --num-experts 512
   --moe-ffn-hidden-size 512
   --moe-router-topk 10
   --moe-router-score-function softmax
   --moe-layer-freq "[1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1]"
   --moe-aux-loss-coeff 0.001
   --moe-grouped-gemm
   --moe-token-dispatcher-type alltoall
   --moe-shared-expert-intermediate-size 512
   --moe-shared-expert-gate
)
