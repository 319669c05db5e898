// Wrapper so etcd builds from the Go module proxy: server/v3's own go.mod has local replace
// directives, which `go install pkg@version` refuses.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() { etcdmain.Main(os.Args) }
