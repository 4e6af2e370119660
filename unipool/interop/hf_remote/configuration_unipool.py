"""Configuration of an exported unipool model (self-contained: imports transformers only).

Standard transformers names are used where one exists (hidden_size, num_hidden_layers, ...), so that
generation utilities and caches find them; the MoE fields follow unipool's ModelConfig. `unipool` holds
the complete original ModelConfig so that `unipool import` can restore it exactly.
"""

from transformers import PretrainedConfig


class UnipoolConfig(PretrainedConfig):
    model_type = "unipool"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(
        self,
        vocab_size=512,
        padded_vocab_size=None,  # embedding / output rows; logits are sliced to vocab_size
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=None,
        qk_norm="none",  # none | head (Qwen3-style) | full (OLMoE-style)
        max_position_embeddings=128,
        rope_base=10000.0,  # not "rope_theta": transformers rewrites that name into rope_parameters
        rms_norm_eps=1e-5,
        n_pools=1,  # expert pools; layer l uses pool l // (num_hidden_layers // n_pools)
        num_experts=8,  # experts per pool (router width)
        num_experts_per_tok=1,
        expert_hidden=128,
        router="norm",  # softmax | norm | sigmoid | random
        renormalize=False,
        routed_scaling_factor=1.0,  # softmax/sigmoid: the picked gates times this factor
        norm_router_c=1.0,  # the NormRouter constant c, as a number
        norm_router_eps=1e-8,
        random_gates="uniform",
        router_masked=False,  # each router has a candidate_mask of the experts it may pick (a router window)
        private_hidden=0,  # width of each layer's always-on private SwiGLU expert (0: none)
        depth_embedding=False,  # a per-layer vector added to the routed experts' input
        expert_kernel="auto",  # auto (grouped GEMMs where torch._grouped_mm takes the shapes) | grouped_mm | loop
        initializer_range=0.02,
        use_cache=True,
        unipool=None,
        tie_word_embeddings=False,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.padded_vocab_size = padded_vocab_size or vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.head_dim = head_dim or hidden_size // num_attention_heads
        self.qk_norm = qk_norm
        self.max_position_embeddings = max_position_embeddings
        self.rope_base = rope_base
        self.rms_norm_eps = rms_norm_eps
        self.n_pools = n_pools
        self.num_experts = num_experts
        self.num_experts_per_tok = num_experts_per_tok
        self.expert_hidden = expert_hidden
        self.router = router
        self.renormalize = renormalize
        self.routed_scaling_factor = routed_scaling_factor
        self.norm_router_c = norm_router_c
        self.norm_router_eps = norm_router_eps
        self.random_gates = random_gates
        self.router_masked = router_masked
        self.private_hidden = private_hidden
        self.depth_embedding = depth_embedding
        if expert_kernel not in ("auto", "grouped_mm", "loop"):
            raise ValueError(f"expert_kernel must be auto, grouped_mm or loop, not {expert_kernel!r}")
        self.expert_kernel = expert_kernel
        self.initializer_range = initializer_range
        self.use_cache = use_cache
        self.unipool = unipool
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)

    def pool_of_layer(self, layer):
        return layer // (self.num_hidden_layers // self.n_pools)
