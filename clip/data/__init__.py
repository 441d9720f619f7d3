"""The data path: discover inputs, decode them, embed batches, write outputs, plan and resume.

One module per concern; :mod:`clip.pipeline`, :mod:`clip.shards`, :mod:`clip.distributed` and the
command line are thin users of these pieces.
"""
