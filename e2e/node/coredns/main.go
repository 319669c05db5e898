// CoreDNS with only the plugins the real test node needs. Upstream's main imports every plugin
// (core/plugin) and so builds cloud SDKs and `forward`; this one leaves `forward` out on purpose:
// the cluster DNS must never ask the machine's resolver (nothing leaves the machine).
package main

import (
	"github.com/coredns/coredns/core/dnsserver"
	"github.com/coredns/coredns/coremain"

	_ "github.com/coredns/coredns/plugin/bind"
	_ "github.com/coredns/coredns/plugin/cache"
	_ "github.com/coredns/coredns/plugin/errors"
	_ "github.com/coredns/coredns/plugin/health"
	_ "github.com/coredns/coredns/plugin/hosts"
	_ "github.com/coredns/coredns/plugin/kubernetes"
	_ "github.com/coredns/coredns/plugin/log"
	_ "github.com/coredns/coredns/plugin/loop"
	_ "github.com/coredns/coredns/plugin/ready"
	_ "github.com/coredns/coredns/plugin/reload"
)

// The same relative order as upstream's plugin.cfg (order decides which plugin sees a query first).
var directives = []string{
	"reload", "bind", "ready", "health", "errors", "log", "cache", "hosts", "kubernetes", "loop",
}

func init() { dnsserver.Directives = directives }

func main() { coremain.Run() }
