"""Layer 7, models: Megatron layer specs with the plugin's modules and the model builders."""
