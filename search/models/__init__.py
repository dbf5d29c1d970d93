"""The user's CNN: ``build`` (an architecture by name or ``module:function``), ``weights`` (loading a
state_dict or checkpoint into it, with diagnostics that say what does not fit and why) and
``checkpoint`` (this tool's own checkpoint files and their hashes).
"""
