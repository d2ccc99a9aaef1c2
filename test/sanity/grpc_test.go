package sanity

import "google.golang.org/grpc"

func newGRPC() *grpc.Server { return grpc.NewServer() }
