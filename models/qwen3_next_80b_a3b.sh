# Megatron-LM MODEL_ARGS for qwen3_next_80b_a3b. Generated from models/qwen3_next_80b_a3b/config.json by `make model-args`
# (tools/gen_model_args.py); edit the generator, not this file. slime users: models/qwen3_next_80b_a3b.slime.sh.
# Use: source models/qwen3_next_80b_a3b.sh; torchrun ... pretrain_gpt.py "${MODEL_ARGS[@]}" --load <make convert output> ...
# The converted checkpoint also carries the MTP block (mtp.layers.0.*): add --mtp-num-layers 1 to train it.
MODEL_ARGS=(
   --num-layers 48
   --hidden-size 2048
   --ffn-hidden-size 5120
   --num-attention-heads 16
   --group-query-attention
   --num-query-groups 2
   --kv-channels 256
   --attention-output-gate
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
   --experimental-attention-variant gated_delta_net
   --linear-attention-freq 4
   --linear-conv-kernel-dim 4
   --linear-key-head-dim 128
   --linear-value-head-dim 128
   --linear-num-key-heads 16
   --linear-num-value-heads 32
   --untie-embeddings-and-output-weights
   --num-experts 512
   --moe-ffn-hidden-size 512
   --moe-router-topk 10
   --moe-router-score-function softmax
   --moe-layer-freq 1
   --moe-aux-loss-coeff 0.001
   --moe-grouped-gemm
   --moe-token-dispatcher-type alltoall
   --moe-shared-expert-intermediate-size 512
   --moe-shared-expert-gate
)
