// The VM's network: one subnet behind an NSG that admits HTTPS and the ACME HTTP challenge,
// denies the engine's port explicitly, and keeps SSH closed unless a source range is given.

param location string
param namePrefix string

@description('DNS label of the public IP: <label>.<region>.cloudapp.azure.com.')
param dnsLabel string

@description('Source range allowed to SSH in (e.g. 203.0.113.7/32); empty keeps SSH closed.')
param sshSourceRange string = ''

@description('Create the public IP (single VM); a scale set puts its address on the load balancer.')
param createPublicIp bool = true

var sshRule = [
  {
    name: 'allow-ssh-from-operator'
    properties: {
      priority: 130
      direction: 'Inbound'
      access: 'Allow'
      protocol: 'Tcp'
      sourceAddressPrefix: sshSourceRange
      sourcePortRange: '*'
      destinationAddressPrefix: '*'
      destinationPortRange: '22'
    }
  }
]

resource nsg 'Microsoft.Network/networkSecurityGroups@2023-09-01' = {
  name: '${namePrefix}-nsg'
  location: location
  properties: {
    securityRules: concat([
      {
        name: 'allow-https'
        properties: {
          priority: 100
          direction: 'Inbound'
          access: 'Allow'
          protocol: 'Tcp'
          sourceAddressPrefix: 'Internet'
          sourcePortRange: '*'
          destinationAddressPrefix: '*'
          destinationPortRange: '443'
        }
      }
      {
        // Caddy answers the ACME HTTP-01 challenge and redirects everything else to HTTPS.
        name: 'allow-http-acme'
        properties: {
          priority: 110
          direction: 'Inbound'
          access: 'Allow'
          protocol: 'Tcp'
          sourceAddressPrefix: 'Internet'
          sourcePortRange: '*'
          destinationAddressPrefix: '*'
          destinationPortRange: '80'
        }
      }
      {
        // The engine listens on 127.0.0.1 only; this rule keeps it closed even if that changes.
        name: 'deny-engine-port'
        properties: {
          priority: 120
          direction: 'Inbound'
          access: 'Deny'
          protocol: '*'
          sourceAddressPrefix: '*'
          sourcePortRange: '*'
          destinationAddressPrefix: '*'
          destinationPortRange: '8000'
        }
      }
    ], empty(sshSourceRange) ? [] : sshRule)
  }
}

resource vnet 'Microsoft.Network/virtualNetworks@2023-09-01' = {
  name: '${namePrefix}-vnet'
  location: location
  properties: {
    addressSpace: {
      addressPrefixes: [
        '10.40.0.0/16'
      ]
    }
    subnets: [
      {
        name: 'serving'
        properties: {
          addressPrefix: '10.40.1.0/24'
          networkSecurityGroup: {
            id: nsg.id
          }
          // Key Vault and the model's storage admit this subnet through their firewalls.
          serviceEndpoints: [
            {
              service: 'Microsoft.KeyVault'
            }
            {
              service: 'Microsoft.Storage'
            }
          ]
        }
      }
    ]
  }
}

resource publicIp 'Microsoft.Network/publicIPAddresses@2023-09-01' = if (createPublicIp) {
  name: '${namePrefix}-ip'
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

output subnetId string = vnet.properties.subnets[0].id
output nsgId string = nsg.id
output publicIpId string = createPublicIp ? publicIp.id : ''
output fqdn string = createPublicIp ? publicIp.properties.dnsSettings.fqdn : ''
