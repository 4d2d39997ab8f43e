"""The shared vocabulary of tinkerq, pure Python (no Flask, no SQLAlchemy, no torch).

The SDK's wire types and codecs (`wire`), the loss table (`losses`), request kinds and the
job/outcome that cross into the engine (`jobs`), the input checks that REST and batch
scripts both apply (`checks`) and tinker:// paths (`paths`). Imports only `config`.
"""
