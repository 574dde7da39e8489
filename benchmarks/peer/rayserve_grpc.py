"""What Ray Serve's gRPC proxy registers: attnrec.v1.Recommender's generated servicer function, with
the messages made picklable under the name protoc gave them.

Ray Serve's proxy and replica processes pass the RecommendRequest and RecommendReply messages to
each other pickled, and pickle finds a class by its module's name. protoc names our messages'
module after the .proto's path, `attnrec.v1.recommender_pb2`, which is not an importable module
here (the stubs live at attnrec.engine.rpc.attnrec.v1); without an alias every call fails with
"Can't pickle <class 'attnrec.v1.recommender_pb2.RecommendRequest'>". Importing this module adds
that alias: the proxy imports it as its `grpc_servicer_functions` entry, the deployment in each
replica. Runs in Ray Serve's environment (benchmarks/peer/rayserve.py); imports only the stubs.
"""

import sys

from attnrec.engine.rpc.attnrec.v1 import recommender_pb2, recommender_pb2_grpc

PROTOC_NAME = recommender_pb2.DESCRIPTOR.name.removesuffix(".proto").replace("/", ".") + "_pb2"
sys.modules.setdefault(PROTOC_NAME, recommender_pb2)

add_RecommenderServicer_to_server = recommender_pb2_grpc.add_RecommenderServicer_to_server
