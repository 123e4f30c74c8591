"""snapshop: visual search for e-commerce."""

import os

__version__ = "0.1.0"

# gRPC (pymilvus; Ray) runs its fork handlers in every child this process forks; with its
# threads busy, a child forked to exec a server binary (`dbserver`: pg_ctl as the service user)
# crashed before exec (SIGSEGV, 1-2 of 300 forks measured). snapshop's children all exec, so
# they need none of gRPC's fork support. Set before gRPC loads; a value the user set stays.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
