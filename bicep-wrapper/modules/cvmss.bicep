// More than one confidential GPU VM: a scale set behind a Standard load balancer. Each instance
// boots the same user data and attests on its own; they share the scale set's identity.

param location string
param namePrefix string
param vmSize string
param adminUsername string
param instanceCount int

@secure()
param sshPublicKey string

param subnetId string

@description('DNS label of the load balancer\'s public IP.')
param dnsLabel string

@secure()
param userData string

param diskEncryptionSetId string = ''
param image object

resource lbIp 'Microsoft.Network/publicIPAddresses@2023-09-01' = {
  name: '${namePrefix}-lb-ip'
  location: location
  sku: {
    name: 'Standard'
  }
  properties: {
    publicIPAllocationMethod: 'Static'
    dnsSettings: {
      domainNameLabel: dnsLabel
    }
  }
}

var lbName = '${namePrefix}-lb'

resource lb 'Microsoft.Network/loadBalancers@2023-09-01' = {
  name: lbName
  location: location
  sku: {
    name: 'Standard'
  }
  properties: {
    frontendIPConfigurations: [
      {
        name: 'public'
        properties: {
          publicIPAddress: {
            id: lbIp.id
          }
        }
      }
    ]
    backendAddressPools: [
      {
        name: 'serving'
      }
    ]
    probes: [
      {
        // Caddy's GET /readyz on port 80 is 200 only while the engine's /health is: an instance
        // that does not serve (starting, or stopped by a revocation) leaves the rotation. A TCP
        // probe could not tell: Caddy keeps listening, to answer 503 with attestd's reason.
        name: 'ready'
        properties: {
          protocol: 'Http'
          port: 80
          requestPath: '/readyz'
          intervalInSeconds: 5
          numberOfProbes: 2
        }
      }
    ]
    loadBalancingRules: [for port in [443, 80]: {
      name: 'tcp-${port}'
      properties: {
        protocol: 'Tcp'
        frontendPort: port
        backendPort: port
        frontendIPConfiguration: {
          id: resourceId('Microsoft.Network/loadBalancers/frontendIPConfigurations', lbName, 'public')
        }
        backendAddressPool: {
          id: resourceId('Microsoft.Network/loadBalancers/backendAddressPools', lbName, 'serving')
        }
        probe: {
          id: resourceId('Microsoft.Network/loadBalancers/probes', lbName, 'ready')
        }
      }
    }]
  }
}

resource vmss 'Microsoft.Compute/virtualMachineScaleSets@2023-09-01' = {
  //checkov:skip=CKV_AZURE_97:confidential VMs do not support encryption at host; the OS disk and the VM guest state are encrypted by confidential disk encryption (DiskWithVMGuestState)
  //checkov:skip=CKV_AZURE_95:a new OS image changes the measured boot that the KEK's release depends on; images roll out by a deliberate reimage (upgradePolicy Manual), not automatically
  name: '${namePrefix}-vmss'
  location: location
  sku: {
    name: vmSize
    capacity: instanceCount
  }
  identity: {
    type: 'SystemAssigned'
  }
  properties: {
    orchestrationMode: 'Uniform'
    upgradePolicy: {
      mode: 'Manual' // a new image or user data rolls out only when the operator reimages
    }
    virtualMachineProfile: {
      securityProfile: {
        securityType: 'ConfidentialVM'
        uefiSettings: {
          secureBootEnabled: true
          vTpmEnabled: true
        }
      }
      storageProfile: {
        imageReference: image
        osDisk: {
          createOption: 'FromImage'
          managedDisk: {
            storageAccountType: 'Premium_LRS'
            securityProfile: {
              securityEncryptionType: 'DiskWithVMGuestState'
              diskEncryptionSet: empty(diskEncryptionSetId) ? null : {
                id: diskEncryptionSetId
              }
            }
          }
        }
      }
      osProfile: {
        computerNamePrefix: take(namePrefix, 9)
        adminUsername: adminUsername
        customData: base64(userData)
        linuxConfiguration: {
          disablePasswordAuthentication: true
          ssh: {
            publicKeys: [
              {
                path: '/home/${adminUsername}/.ssh/authorized_keys'
                keyData: sshPublicKey
              }
            ]
          }
        }
        allowExtensionOperations: false
      }
      networkProfile: {
        networkInterfaceConfigurations: [
          {
            name: 'primary'
            properties: {
              primary: true
              ipConfigurations: [
                {
                  name: 'primary'
                  properties: {
                    subnet: {
                      id: subnetId
                    }
                    loadBalancerBackendAddressPools: [
                      {
                        id: lb.properties.backendAddressPools[0].id
                      }
                    ]
                  }
                }
              ]
            }
          }
        ]
      }
    }
  }
}

output principalId string = vmss.identity.principalId
output fqdn string = lbIp.properties.dnsSettings.fqdn
