"""The Adaptive Clustering router (``ACRouter(DPSLRouter)``): its feature weights, the previous
MoE layer's assignment it reads, and the router itself."""
