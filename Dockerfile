# Build: docker build -t oneagent-csi .
FROM golang:1.26-bookworm AS build
WORKDIR /src
COPY go.mod go.sum ./
RUN go mod download
COPY . .
ARG VERSION=dev
RUN CGO_ENABLED=0 go build -trimpath -ldflags "-s -w -X main.version=${VERSION}" -o /out/oneagent-csi ./cmd/oneagent-csi

# The node driver mounts with system calls (overlay, open_tree/move_mount), so
# the runtime image needs no mount(8); distroless static has CA certificates.
FROM gcr.io/distroless/static-debian12
COPY --from=build /out/oneagent-csi /usr/local/bin/oneagent-csi
USER 0
ENTRYPOINT ["/usr/local/bin/oneagent-csi"]
